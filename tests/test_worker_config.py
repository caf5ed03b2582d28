"""Worker configuration: documented defaults, user file / $WORKBENCH_CONFIG overrides, clear errors."""
import pytest

from workbench.worker.config import DEFAULT_FILE, ConfigError, WorkerConfig


def test_defaults_are_clockworks(monkeypatch):
    monkeypatch.delenv("WORKBENCH_CONFIG", raising=False)
    c = WorkerConfig.load()
    assert c.page_size == 16 * 2**20 and c.weights_cache_size == 23085449216 and c.num_pages == 1376
    assert c.io_pool_size == c.workspace_pool_size == c.host_io_pool_size == 512 * 2**20
    assert c.telemetry is False and c.allow_zero_size_inputs is True and c.copy_input_lead_in == 5_000_000
    assert c.wake_early == 200_000 and c.exec_wake_ahead == 400_000 and c.submit_wait_max == 100_000
    assert c.exec_rehearse is True
    assert all(k in DEFAULT_FILE.read_text()
               for k in ("weights_cache_size", "exec_wake_ahead", "exec_rehearse", "submit_wait_max"))


def test_wake_early_is_a_duration_given_to_every_executor_thread():
    from workbench.worker.cpu import CPUWorker
    assert WorkerConfig.load(None).wake_early == 200_000
    w = CPUWorker(WorkerConfig.load(None, wake_early="50 us", weights_cache_size="64 MiB"))
    try:
        ex = [e for st in w.gpus for e in st.executors.values()] + [w.disk, w.control]
        assert ex and {e.wake_early for e in ex} == {50_000}
    finally:
        w.close()


def test_user_file_overrides_only_its_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKBENCH_CONFIG", raising=False)
    f = tmp_path / "w.toml"
    f.write_text('weights_cache_size = "1 GiB"\npage_size = "4 MiB"\ncopy_input_lead_in = "2 ms"\n')
    c = WorkerConfig.load(f)
    assert (c.weights_cache_size, c.page_size, c.num_pages, c.copy_input_lead_in) == (2**30, 4 * 2**20, 256, 2_000_000)
    assert c.io_pool_size == 512 * 2**20 and str(f) in c.source


def test_env_var_names_the_file(tmp_path, monkeypatch):
    f = tmp_path / "env.toml"
    f.write_text("telemetry = true\n")
    monkeypatch.setenv("WORKBENCH_CONFIG", str(f))
    assert WorkerConfig.load().telemetry is True
    monkeypatch.setenv("WORKBENCH_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"missing\.toml.*WORKBENCH_CONFIG"):
        WorkerConfig.load()


def test_unknown_key_is_rejected_naming_key_and_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("weights_cache_sise = 100\n")
    with pytest.raises(ConfigError) as e:
        WorkerConfig.load(f)
    assert "weights_cache_sise" in str(e.value) and str(f) in str(e.value)
    with pytest.raises(ConfigError, match="pagesize"):
        WorkerConfig.load(None, pagesize=4)


@pytest.mark.parametrize("text, match", [
    ('page_size = "sixteen"', "page_size"),
    ("telemetry = 1", "telemetry"),
    ('weights_cache_size = "1 MiB"', "smaller than one page"),
    ("io_pool_size = 0", "io_pool_size"),
    ("page_size = [", "not valid TOML"),
    ("wake_early = -1", "wake_early must be >= 0"),
    ("exec_wake_ahead = -1", "exec_wake_ahead must be >= 0"),
    ('exec_wake_ahead = "early"', "exec_wake_ahead"),
    ("exec_rehearse = 1", "exec_rehearse = 1 must be true or false"),
    ("submit_wait_max = -5", "submit_wait_max must be >= 0"),
    ('wake_early = "soon"', "wake_early"),
])
def test_bad_values_name_the_key(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        WorkerConfig.load(f)


def test_free_memory_check_explains_the_fix():
    c = WorkerConfig.load(None, weights_cache_size="20 GiB")
    c.check_fits(40 * 2**30, "GPU 0")
    with pytest.raises(ConfigError, match=r"GPU 0 has 8\.00 GiB free.*lower weights_cache_size"):
        c.check_fits(8 * 2**30, "GPU 0")


def test_replace_validates():
    c = WorkerConfig.load(None).replace(page_size=2**20)
    assert c.num_pages == 23085449216 // 2**20
    with pytest.raises(ConfigError, match="nope"):
        c.replace(nope=1)
