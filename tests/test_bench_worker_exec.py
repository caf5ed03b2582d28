"""bench.worker_exec's --set: worker config values read as the config file reads them, checked before measuring."""
import pytest

from bench.worker_exec import _toml_value, main
from workbench.worker.config import ConfigError


def test_set_values_read_as_in_the_config_file():
    assert _toml_value("0") == 0 and _toml_value("true") is True and _toml_value('"300 us"') == "300 us"
    assert _toml_value("300 us") == "300 us"          # not TOML: the text itself, parsed as a duration later


@pytest.mark.parametrize("kv, match", [("exec_wake_ahead=-1", "exec_wake_ahead must be >= 0"),
                                       ("wake_ahead=1", "wake_ahead")])
def test_a_bad_setting_stops_before_measuring(kv, match):
    with pytest.raises(ConfigError, match=match):
        main(["--device", "cpu", "--models", "no_such_model", "--set", kv])
