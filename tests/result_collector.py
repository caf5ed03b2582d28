"""A worker's `on_result` for tests: every result by action id, and every id answered more than once."""
import threading


class Collector:
    def __init__(self):
        self.results, self.dupes = {}, []
        self.cv = threading.Condition()

    def __call__(self, r):
        with self.cv:
            if r.id in self.results:
                self.dupes.append(r)
            self.results[r.id] = r
            self.cv.notify_all()

    def wait(self, *ids, timeout=60):
        with self.cv:
            assert self.cv.wait_for(lambda: all(i in self.results for i in ids), timeout), \
                f"no result for {[i for i in ids if i not in self.results]}"
        return self.results[ids[0]] if len(ids) == 1 else [self.results[i] for i in ids]
