/* workbench.telemetry._rowpack: pack one telemetry row (a tuple of numbers) into a bytearray, 8 bytes a value.

   What `struct.Struct(layout).pack_into(buf, offset, *row)` does for the row writers (row_writer.py), at a
   fraction of its cost: struct converts every value through its generic item machinery (~140 instructions a
   value, measured under callgrind) and needs the row spread into a new argument tuple; here a plain int or
   float takes a few instructions. The same values pack as with struct ('q' / 'd' codes): an int, a bool or
   anything with __index__ as int64; a float, an int or anything with __float__ as a double. Anything else (None,
   a str, an int out of range) packs nothing and returns False, so the caller takes the recorder's checking path,
   which names the value. Built with the compiled core (setup.py, WORKBENCH_COMPILE=1); without it row_writer.py
   uses struct. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int as_int64(PyObject *v, long long *out) {
    int overflow = 0;
#if PY_VERSION_HEX < 0x030C0000
    if (PyLong_CheckExact(v)) {        /* the usual row value: an int of up to two 30-bit digits (< 2**60), read
                                          in place (CPython < 3.12's layout; 3.12+ takes PyLong_AsLongLong...) */
        Py_ssize_t size = Py_SIZE(v);
        const digit *d = ((PyLongObject *)v)->ob_digit;
        if (size >= -2 && size <= 2) {
            long long x = size == 0 ? 0 : (long long)d[0];
            if (size == 2 || size == -2) {
                x |= (long long)d[1] << PyLong_SHIFT;
            }
            *out = size < 0 ? -x : x;
            return 1;
        }
    }
#endif
    if (PyLong_Check(v)) {
        *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    } else {
        if (PyFloat_Check(v)) {        /* struct refuses floats for 'q' too (no silent truncation) */
            return 0;
        }
        PyObject *ix = PyNumber_Index(v);
        if (ix == NULL) {
            PyErr_Clear();
            return 0;
        }
        *out = PyLong_AsLongLongAndOverflow(ix, &overflow);
        Py_DECREF(ix);
    }
    if (overflow || (*out == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

static int as_double(PyObject *v, double *out) {
    *out = PyFloat_CheckExact(v) ? PyFloat_AS_DOUBLE(v) : PyFloat_AsDouble(v);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* pack(buf: bytearray, offset: int, row: tuple, layout: bytes) -> bool
   layout[i] is b'd' for a double, any other byte for an int64; len(row) must equal len(layout). */
static PyObject *pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "pack(buf, offset, row, layout) takes 4 arguments");
        return NULL;
    }
    PyObject *buf = args[0], *row = args[2], *layout = args[3];
    if (!PyByteArray_Check(buf) || !PyTuple_Check(row) || !PyBytes_Check(layout)) {
        PyErr_SetString(PyExc_TypeError, "pack(buf, offset, row, layout): a bytearray, an int, a tuple, bytes");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(row);
    if (n != PyBytes_GET_SIZE(layout)) {
        Py_RETURN_FALSE;               /* a row of the wrong length: the checking path names it */
    }
    if (offset < 0 || offset > PyByteArray_GET_SIZE(buf) - 8 * n) {
        PyErr_Format(PyExc_ValueError, "pack: %zd values do not fit at offset %zd of a %zd-byte buffer", n,
                     offset, PyByteArray_GET_SIZE(buf));
        return NULL;
    }
    const char *kind = PyBytes_AS_STRING(layout);
    long long values[64];              /* converted first, so a row that fails writes nothing */
    if (n > 64) {
        Py_RETURN_FALSE;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(row, i);
        if (kind[i] == 'd') {
            double d;
            if (!as_double(v, &d)) {
                Py_RETURN_FALSE;
            }
            memcpy(&values[i], &d, 8);
        } else if (!as_int64(v, &values[i])) {
            Py_RETURN_FALSE;
        }
    }
    memcpy(PyByteArray_AS_STRING(buf) + offset, values, 8 * n);
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"pack", (PyCFunction)(void (*)(void))pack, METH_FASTCALL,
     "pack(buf, offset, row, layout) -> bool: row's values into buf[offset:], 8 bytes each (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rowpack",
                                    "One telemetry row packed into a bytearray (see _rowpack.c).", -1, methods};

PyMODINIT_FUNC PyInit__rowpack(void) { return PyModule_Create(&module); }
