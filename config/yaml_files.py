"""Reading exitplan's YAML files: a configuration, a provider profile, the deployments file.

They are read as plain data, bounded in time and memory, with every key written once:

- **No anchors, aliases or merge keys.** A file means what it says where it says it: a security
  officer or an auditor reviewing a configuration reads each value in its place, never behind an
  indirection. Refusing them outright also removes, with no budget to tune, the alias bomb (a few
  hundred bytes that expand to billions of nodes), the alias that contains itself, and the merge
  key that silently overrides a key written above it (docs/DESIGN.md, "YAML files").
- **Every mapping key once, at any depth.** PyYAML keeps the last of two equal keys: a second
  `datasets:` block would silently drop the first one.
- **At most `MAX_FILE_BYTES`, nested at most `MAX_DEPTH` levels.** Without aliases the data built
  is proportional to the file, and the depth bound keeps the composer's recursion far from
  Python's limit.

Every problem is a `ConfigFileError` (exit code 2): one sentence naming the file, the line and
the fix; never a value of the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigFileError

# Bytes. A configuration is a few KiB; PyYAML reads the densest YAML at about 70 KiB a second
# (1 MiB: 14 s and 250 MB), so the bound is also the time and memory a hostile file can cost.
MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 64  # nesting levels of mappings and sequences; a configuration uses six


class _Refused(yaml.MarkedYAMLError):
    """A construct exitplan's files do not accept (an alias, a duplicate key, too deep a nesting).
    WHAT in its problem stands for the kind of file, filled in by `parse_yaml`."""


class _UniqueKeys:
    """Construction that refuses merge keys and a key written twice in a mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _Refused(problem="a merge key (<<) is not accepted in WHAT; write the keys out in full",
                                   problem_mark=key_node.start_mark)
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: PyYAML's own construction refuses it below
                if first is not key_node:
                    raise _Refused(
                        problem=f"the key {_shown_key(key)} appears twice in the same mapping (first at line "
                                f"{first.start_mark.line + 1}); merge the two into one",
                        problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _StrictLoader(_UniqueKeys, yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses anchors, aliases, merge keys, duplicate keys and deep
    nesting, each with its line and a sentence (`parse_yaml`)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(problem=f"an alias ({_shown_key('*' + event.anchor)}) is not accepted in WHAT; write the value out in full",
                           problem_mark=event.start_mark)
        if getattr(event, "anchor", None) is not None:
            raise _Refused(problem=f"an anchor ({_shown_key('&' + event.anchor)}) is not accepted in WHAT; write each value out in full",
                           problem_mark=event.start_mark)
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"WHAT is nested more than {MAX_DEPTH} levels deep; flatten it", problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# libyaml's parser, where PyYAML has it: a configuration with its provider profiles and price
# catalog (eight files) is read in ~5 ms instead of ~28 with PyYAML's own (in Python), at every
# command. Its events are looked over first for what the rules refuse (an alias, an anchor, too
# deep a nesting), and anything refused or found wrong is read again by `_StrictLoader`, which
# words it: the messages are the same, and so is the data.
_CLoader = getattr(yaml, "CSafeLoader", None)


class _StrictCLoader(_UniqueKeys, _CLoader or yaml.SafeLoader):  # type: ignore[misc]
    """libyaml's parser, PyYAML's construction, keys checked as `_StrictLoader` checks them."""


def _clean_events(text: str) -> bool:
    """Whether libyaml's events for `text` hold nothing the rules may refuse: no alias, no
    anchor, no nesting near `MAX_DEPTH` (half of it: `_StrictLoader` decides those)."""
    depth = 0
    for event in yaml.parse(text, Loader=_CLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            return False
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH // 2:
                return False
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return True


def _shown_key(key: Any) -> str:
    """A mapping key or an anchor's name for a message, cut short (a name, never a value)."""
    text = str(key)
    return f"`{text[:60]}…`" if len(text) > 60 else f"`{text}`"


def parse_yaml(text: str, path: Path | str, what: str) -> Any:
    """The data of YAML `text` read from `path` (`what` the file is, for messages: "the
    configuration file"), under the rules above; a `ConfigFileError` otherwise."""
    if len(text) > MAX_FILE_BYTES:
        raise _too_big(path, what)
    if _CLoader is not None:
        try:
            if _clean_events(text):
                return yaml.load(text, Loader=_StrictCLoader)  # noqa: S506 - a CSafeLoader subclass
        except Exception:  # noqa: BLE001 - whatever it is, the reading below decides and words it
            pass
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        if isinstance(exc, _Refused):
            raise ConfigFileError(f"{path}{at}: {problem.replace('WHAT', what)}") from None
        raise ConfigFileError(f"{path}: not valid YAML{at}: {problem}") from None


def load_yaml_file(path: Path, what: str) -> Any:
    """`parse_yaml` of the file at `path`, read as UTF-8, at most `MAX_FILE_BYTES` read.

    A missing file raises `FileNotFoundError` (each caller says which file it expected and how to
    name it); any other read problem is a `ConfigFileError`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read {what} ({exc.strerror or exc}); check the path and its permissions") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_big(path, what)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigFileError(f"{path}: {what} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_yaml(text, path, what)


def _too_big(path: Path | str, what: str) -> ConfigFileError:
    return ConfigFileError(f"{path}: {what} is larger than {MAX_FILE_BYTES // 1024} KiB; "
                           "name the right file (a configuration is a few KiB)")
