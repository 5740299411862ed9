"""Reading the YAML a person wrote: any common text encoding, and no silently repeated keys.

Seeds are edited on laptops: Notepad saves UTF-16 or UTF-8 with a byte-order mark, and a key
typed twice would otherwise let the second one win without a word.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any

import yaml


class TextFileError(ValueError):
    """The file cannot be read as YAML text; the message names the file and why."""


def decode_text(data: bytes, path: Path | str) -> str:
    """UTF-8, or UTF-8/UTF-16/UTF-32 with a byte-order mark; anything else is refused."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                          (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as exc:
                raise TextFileError(f"{path}: not valid {encoding.upper()} text at byte "
                                    f"{exc.start}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextFileError(f"{path}: not UTF-8 text (byte {exc.start}: "
                            f"{data[exc.start:exc.start + 1]!r}); save it as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode,
                       deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return dict(loader.construct_mapping(node, deep=deep))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _construct_mapping)


def parse_yaml(text: str, path: Path | str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TextFileError(f"{path}:{where} not valid YAML: {problem}") from None


def read_yaml(path: Path) -> Any:
    """The parsed document; TextFileError (one line, naming the file) for anything wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TextFileError(f"{path}: file not found") from None
    except OSError as exc:
        raise TextFileError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_yaml(decode_text(data, path), path)
