"""Hostile configuration files (issue 18, item 6): aliases, duplicate keys, self-referencing
variables, secrets pasted in place of names. Each is exit code 2 and one sentence, within a time
and memory bound, never repeating a secret."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from config import providers
from config.errors import ConfigFileError
from config.loader import MAX_EXPANDED_CHARS, _Expansion, load_config
from config.secrets import read_env
from config.yaml_files import MAX_DEPTH, MAX_FILE_BYTES, parse_yaml
from connectors.kms import KekAuthError, _secret
from flows.deploy_cli import _read_prefect_file

REPO = Path(__file__).resolve().parents[2]
LAB = (REPO / "config/examples/lab.yaml").read_text(encoding="utf-8")

# 430 bytes that expand to 9**8 (43 million) strings when aliases are followed.
ALIAS_BOMB = "".join(
    f"{name}: &{name} [{', '.join([prev] * 9)}]\n"
    for name, prev in zip("abcdefgh", ['"lol"', "*a", "*b", "*c", "*d", "*e", "*f", "*g"])
) + "version: 1\nproject: *h\n"

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
HEX_SECRET = "f3a91c0e7b2d4a6f8e1c3b5d7f9a2c4e"  # a valid variable name, not a usual one

TIME_BOUND = 30  # seconds for a command that must answer at once; the alias bomb ran past 60
MEMORY_BOUND = 1024**3  # bytes of address space; the command needs less than 100 MiB


def _bounded():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BOUND, MEMORY_BOUND))


def exitplan(tmp_path: Path, config_text: str, **env: str) -> tuple[int, str]:
    """`exitplan status --config FILE` in a process of its own, bounded in time and memory:
    (exit code, stderr)."""
    path = tmp_path / "exitplan.yaml"
    path.write_text(config_text, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "--config", str(path)],
        capture_output=True, text=True, timeout=TIME_BOUND, preexec_fn=_bounded, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    return proc.returncode, proc.stderr


def assert_one_sentence(err: str, path_fragment: str = "exitplan.yaml") -> str:
    assert "Traceback" not in err and "Error:" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("exitplan: ") and path_fragment in lines[0], err
    return lines[0]


def test_the_alias_bomb_is_refused_at_once(tmp_path):
    assert len(ALIAS_BOMB.encode()) <= 430
    code, err = exitplan(tmp_path, ALIAS_BOMB)
    assert code == 2
    assert "anchor (`&a`) is not accepted" in assert_one_sentence(err) and "line 1" in err


def test_an_alias_that_contains_itself_is_refused(tmp_path):
    code, err = exitplan(tmp_path, "version: 1\nproject: &p [*p]\n")
    assert code == 2
    assert "is not accepted in the configuration file" in assert_one_sentence(err)


def test_a_variable_whose_value_references_itself_is_not_expanded_again(tmp_path):
    code, err = exitplan(tmp_path, LAB.replace("project: lab-exit", "project: ${BK}${BK}"), BK="${BK}${BK}")
    assert code == 2
    sentence = assert_one_sentence(err)
    assert "field `project`" in sentence and "'${BK}${BK}${BK}${BK}'" in sentence


def test_a_huge_variable_is_refused_without_being_repeated(tmp_path):
    # One variable may hold 128 KiB on Linux: a file repeating it grows past the bound.
    repeats = MAX_EXPANDED_CHARS // 100_000 + 1
    code, err = exitplan(tmp_path, LAB.replace("project: lab-exit", "project: " + "${BIG}" * repeats), BIG="x" * 100_000)
    assert code == 2
    sentence = assert_one_sentence(err)
    assert "field `project`" in sentence and "once its ${VARIABLES} are expanded" in sentence
    assert "xxxxxxxx" not in sentence


def _line_of(text: str, line: str, after: int = 0) -> int:
    """The 1-based number of the first line equal to `line` after line `after`."""
    return text.splitlines().index(line, after) + 1


_DATASETS_TWICE = LAB + "\ndatasets:\n  other:\n    source: azurite\n    container: other\n    destination: lab-s3\n"
_CONTAINER_TWICE = LAB.replace("    container: claims\n", "    container: claims\n    container: stays\n")


@pytest.mark.parametrize("text, key, lines", [
    (_DATASETS_TWICE, "datasets", (f"line {_line_of(LAB, 'datasets:')}",
                                   f"at line {_line_of(_DATASETS_TWICE, 'datasets:', _line_of(LAB, 'datasets:'))}")),
    (_CONTAINER_TWICE, "container", (f"line {_line_of(LAB, '    container: claims')}",
                                     f"at line {_line_of(LAB, '    container: claims') + 1}")),
])
def test_a_key_written_twice_is_refused_at_any_depth(tmp_path, text, key, lines):
    code, err = exitplan(tmp_path, text)
    assert code == 2
    sentence = assert_one_sentence(err)
    assert f"the key `{key}` appears twice" in sentence
    assert all(line in sentence for line in lines), sentence


def test_a_secret_pasted_into_an_env_field_is_not_echoed(tmp_path):
    text = LAB.replace("secret_access_key_env: AWS_SECRET_ACCESS_KEY", f"secret_access_key_env: {SECRET}")
    code, err = exitplan(tmp_path, text)
    assert code == 2
    sentence = assert_one_sentence(err)
    assert "secret_access_key_env" in sentence and "is not the name of an environment variable" in sentence
    assert SECRET not in err and "EXAMPLEKEY" not in err


def test_a_secret_expanded_into_an_env_field_is_not_echoed(tmp_path):
    text = LAB.replace("secret_access_key_env: AWS_SECRET_ACCESS_KEY", "secret_access_key_env: ${THE_KEY}")
    code, err = exitplan(tmp_path, text, THE_KEY=SECRET)
    assert code == 2
    assert "secret_access_key_env" in assert_one_sentence(err)
    assert SECRET not in err


def test_a_secret_pasted_into_a_block_field_is_not_echoed(tmp_path):
    text = LAB.replace("secret_access_key_env: AWS_SECRET_ACCESS_KEY", f"secret_access_key_block: {SECRET}")
    code, err = exitplan(tmp_path, text)
    assert code == 2
    assert "not a Prefect block reference" in assert_one_sentence(err)
    assert SECRET not in err


def test_a_secret_that_reads_as_a_variable_name_is_not_echoed_when_unset(monkeypatch):
    monkeypatch.delenv(HEX_SECRET, raising=False)
    with pytest.raises(ConfigFileError) as caught:
        read_env("c.yaml", "keys.kek.token_env", HEX_SECRET)
    assert HEX_SECRET not in str(caught.value) and "keys.kek.token_env" in str(caught.value)


def test_a_kek_secret_that_reads_as_a_variable_name_is_not_echoed_when_unset(monkeypatch):
    monkeypatch.delenv(HEX_SECRET, raising=False)
    with pytest.raises(KekAuthError) as caught:
        _secret(HEX_SECRET, "OpenBao/Vault token", "openbao")
    assert HEX_SECRET not in str(caught.value) and "is not set" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# The loader itself
# ---------------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_merge_key_is_refused(tmp_path):
    text = LAB.replace("  claims:\n    source: azurite\n", "  claims:\n    <<: {source: azurite}\n")
    with pytest.raises(ConfigFileError, match=r"c.yaml at line \d+, column \d+: a merge key \(<<\) is not accepted"):
        load_config(write(tmp_path, text), check_policy=False)


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    text = "project: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(ConfigFileError, match=f"nested more than {MAX_DEPTH} levels deep"):
        load_config(write(tmp_path, text), check_policy=False)


def test_a_file_larger_than_the_bound_is_refused_unread(tmp_path):
    text = LAB + "#" * MAX_FILE_BYTES
    with pytest.raises(ConfigFileError, match=f"c.yaml: the configuration file is larger than {MAX_FILE_BYTES // 1024} KiB"):
        load_config(write(tmp_path, text), check_policy=False)


def test_a_variable_is_expanded_once_and_a_default_read_only_when_needed(tmp_path, monkeypatch):
    for var in ("EP_T_UNSET", "EP_T_UNSET_TOO", "EP_T_NEVER_READ"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EP_T_SET", "-b")
    text = (LAB.replace("project: lab-exit", "project: ${EP_T_UNSET:-lab-${EP_T_UNSET_TOO:-exit}}")
            .replace("bucket: exitplan-lab", "bucket: exitplan-lab${EP_T_SET:-${EP_T_NEVER_READ}}"))
    cfg = load_config(write(tmp_path, text), check_policy=False).config
    assert cfg.project == "lab-exit"
    assert cfg.destinations["lab-s3"].bucket == "exitplan-lab-b"

    monkeypatch.setenv("EP_T_PORT", "${EP_T_OTHER}")
    monkeypatch.setenv("EP_T_OTHER", "9999")
    with pytest.raises(ConfigFileError, match=r"field `project`: '\$\{EP_T_OTHER\}' does not have the expected form"):
        load_config(write(tmp_path, LAB.replace("project: lab-exit", "project: ${EP_T_PORT}")), check_policy=False)


@pytest.mark.parametrize("text", ["a: ${1X}", "a: ${A:-{x}}", "a: ${A", "a: $", "a: ${A:-x"])
def test_text_that_is_not_a_complete_reference_is_kept(tmp_path, text, monkeypatch):
    monkeypatch.delenv("A", raising=False)
    monkeypatch.delenv("B", raising=False)
    data = parse_yaml(text, "c.yaml", "the configuration file")
    assert _Expansion(Path("c.yaml")).node(data, ()) == data


def test_a_provider_profile_with_a_duplicate_key_is_refused(tmp_path, monkeypatch):
    shipped = (providers.CATALOG_DIR / "ionos.yaml").read_text(encoding="utf-8")
    (tmp_path / "extra.yaml").write_text(shipped.replace("name: ionos", "name: extra") + "\nname: other\n", encoding="utf-8")
    monkeypatch.setenv("EXITPLAN_PROVIDERS_DIR", str(tmp_path))
    with pytest.raises(ConfigFileError, match=r"extra.yaml at line \d+, column 1: the key `name` appears twice"):
        providers.load_catalog()


def test_the_deployments_file_refuses_aliases(tmp_path):
    path = tmp_path / "prefect.yaml"
    path.write_text("definitions:\n  pool: &pool {name: p}\ndeployments:\n- name: a\n  work_pool: *pool\n",
                    encoding="utf-8")
    with pytest.raises(ConfigFileError, match="anchor .* is not accepted in the deployments file"):
        _read_prefect_file(path)


REPO = Path(__file__).resolve().parents[2]
SHIPPED_YAML = sorted([*REPO.glob("config/**/*.yaml"), REPO / "deploy" / "prefect.yaml"])


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: str(p.relative_to(REPO)))
def test_libyaml_and_pyyaml_read_every_shipped_file_alike(path):
    # parse_yaml reads with libyaml where PyYAML has it; PyYAML's own reader decides everything
    # else and words every refusal: on exitplan's own files the two give the same data.
    import yaml

    from config import yaml_files

    if yaml_files._CLoader is None:
        pytest.skip("this PyYAML is built without libyaml: PyYAML's own reader reads everything")
    text = path.read_text(encoding="utf-8")
    assert yaml_files._clean_events(text)
    assert parse_yaml(text, path, "x") == yaml.load(text, Loader=yaml_files._StrictLoader)


@pytest.mark.parametrize("text, message", [
    ("a: &x 1\nb: *x\n", r"at line 1, column 4: an anchor \(`&x`\) is not accepted in the file"),
    ("a: 1\nb:\n  c: 2\n  c: 3\n", r"at line 4, column 3: the key `c` appears twice in the same mapping \(first at line 3\)"),
    ("a: [1, 2\n", r"not valid YAML at line 2, column 1"),
    ("<<: {a: 1}\n", r"at line 1, column 1: a merge key \(<<\) is not accepted in the file"),
    ("a: " + "[" * (MAX_DEPTH // 2 + 1) + "]" * (MAX_DEPTH // 2 + 1) + "\n", None),
])
def test_what_libyaml_reads_but_the_rules_refuse_is_worded_by_the_strict_reader(text, message):
    if message is None:  # deep, but within MAX_DEPTH: left to the strict reader, which accepts it
        nested: list = []
        for _ in range(MAX_DEPTH // 2):
            nested = [nested]
        assert parse_yaml(text, "f.yaml", "the file") == {"a": nested}
        return
    with pytest.raises(ConfigFileError, match=message):
        parse_yaml(text, "f.yaml", "the file")
