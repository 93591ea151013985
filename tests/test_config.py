"""tlogserver configuration: flags, TLOG_* variables, YAML, and one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from tlogserver.config import RELOADABLE, ConfigError, ServerConfig, from_sources

from .serverproc import config_free_env

KEY = "12345678901234567890123456789012"


def tlogserver(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = config_free_env()
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tlogserver", *args], capture_output=True,
                          text=True, timeout=60, env=full_env)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["-k", "0"], {}, "k: must be a whole number >= 1"),
    (["--flush-size", "0"], {}, "flush-size: must be a whole number >= 1"),
    (["--flush-time", "-1"], {}, "flush-time: must be a number of seconds > 0"),
    (["--address", "nonsense"], {}, "address: expected host:port"),
    (["--address", "127.0.0.1:99999"], {}, "address: port 99999 out of range"),
    (["--storage-addresses", "127.0.0.1:x"], {}, "storage-addresses"),
    (["--storage-addresses", "127.0.0.1:6379"], {}, "no master key"),
    (["--priv-key", "short"], {}, "priv-key"),
    (["--storage-format", "legacy"], {}, "nonce"),
    (["--nonce", "00"], {}, "nonce: only used with --storage-format legacy"),
    ([], {"TLOG_FLUSH_SIZE": "abc"}, "abc"),
    ([], {"TLOG_K": "0"}, "k: must be a whole number >= 1"),
    (["--memory-storage", "--storage-addresses", "127.0.0.1:6379"], {}, "memory-storage"),
    (["--key-file", "/nonexistent/key"], {}, "/nonexistent/key"),
])
def test_invalid_values_give_one_line_errors(args: list[str], env: dict[str, str],
                                             message: str) -> None:
    result = tlogserver(*args, env=env)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.stderr
    assert message in error_lines[0]
    assert KEY not in result.stderr


def test_help_lists_every_option() -> None:
    result = tlogserver("--help")
    assert result.returncode == 0
    for name in ServerConfig.option_names():
        assert "--" + name.replace("_", "-") in result.stdout, name
    assert "TLOG_" in result.stdout


def test_yaml_file_and_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "tlog.yaml"
    cfg_file.write_text(
        "flush_size: 50\nflush-time: 2\nk: 2\nm: 1\npriv_key: '" + KEY + "'\n"
        "storage_clusters:\n  main:\n    servers: ['127.0.0.1:7000', '127.0.0.1:7001',"
        " '127.0.0.1:7002']\n"
        "vdisks:\n  a: {storage_cluster: main}\n")
    cfg = from_sources({"config": str(cfg_file), "flush_size": 25, "flush_time": 25.0,
                        "k": 4, "m": 2}, explicit={"flush_size"})
    assert cfg.flush_size == 25  # the flag wins over the file
    assert cfg.flush_time == 2.0 and cfg.k == 2 and cfg.m == 1
    assert cfg.storage is not None and cfg.storage.vdisks == {"a": "main"}
    assert not cfg.uses_memory_storage
    assert cfg.master_key == KEY.encode()


@pytest.mark.parametrize(("text", "message"), [
    ("flush_sise: 3\n", "unknown key 'flush_sise'"),
    ("flush_size: many\n", "flush_size: expected a whole number"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("a: [\n", "not valid YAML"),
    ("storage_clusters:\n  main:\n    servers: [a:1, a:2, a:3, a:4, a:5, a:6]\n"
     "vdisks:\n  a: {storage_cluster: nope}\n", "nope"),
    ("vdisks:\n  a: {storage_cluster: nope}\n", "storage_clusters"),
])
def test_bad_yaml_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        from_sources({"config": str(cfg_file)}, explicit=set())
    result = tlogserver("--config", str(cfg_file))
    assert result.returncode == 2 and message.split("'")[0] in result.stderr


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="config /no/such.yaml"):
        from_sources({"config": "/no/such.yaml"}, explicit=set())


def test_key_file_and_env_key(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    cfg = ServerConfig(key_file=str(key_file), storage_addresses=["127.0.0.1:7000"]).validate()
    assert cfg.master_key == KEY.encode() and not cfg.ephemeral_key
    cfg = ServerConfig().validate()
    assert cfg.ephemeral_key and cfg.uses_memory_storage
    with pytest.raises(ConfigError, match="only one master key"):
        ServerConfig(key_file=str(key_file), priv_key=KEY).validate()


def test_storage_autofill() -> None:
    cfg = ServerConfig(storage_addresses=["127.0.0.1:7000"], priv_key=KEY).validate()
    assert not cfg.uses_memory_storage
    with pytest.raises(ConfigError, match="storage-addresses"):
        ServerConfig(storage_addresses=["a:1", "b:2", "c:3", "d:4", "e:5", "f:6", "g:7"],
                     priv_key=KEY).validate()


def test_a_reload_builds_a_new_config_and_leaves_the_running_one_alone(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    running = ServerConfig(key_file=str(key_file), storage_addresses=["127.0.0.1:7000"],
                           flush_size=25).validate()
    before = copy.deepcopy(running)
    key_file.write_text("another key, not read before a restart\n")
    new = ServerConfig(priv_key=KEY, storage_addresses=["127.0.0.1:7000"], flush_size=7, k=3,
                       access="token").validate()
    merged = running.reloaded(new, RELOADABLE, storage=False)
    assert running == before and merged is not running
    assert (merged.flush_size, merged.k, merged.key_file) == (7, 4, str(key_file))
    assert merged.master_key == KEY.encode()  # the running key, the file not read again
    assert merged.access_policy == new.access_policy != running.access_policy
    # A mix that does not hold together is refused as a whole.
    legacy = ServerConfig(priv_key=KEY, storage_format="legacy", nonce="ab" * 12).validate()
    with pytest.raises(ConfigError, match="retention: the legacy storage format"):
        legacy.reloaded(ServerConfig(retention_keep_sequences=10).validate(), RELOADABLE,
                        storage=False)
