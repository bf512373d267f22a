"""Read SGLang's own source (when present) to hold the fakes and the plugin's records against it.

SGLang cannot be installed on CPU-only machines, but its wheel can be unpacked without its
dependencies; point ``DRAFTFLOW_SGLANG_SRC`` at the unpacked directory (the one holding
``sglang/``), or have SGLang importable, and these tests compare against the real files.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

# scripts/setup.sh --test unpacks SGLang 0.5.23's Python files here.
_CANDIDATES = (str(Path(__file__).resolve().parents[2] / ".cache" / "sglang-src"),)


def sglang_root() -> Path | None:
    """The directory holding the ``sglang`` package source, or None."""
    env = os.environ.get("DRAFTFLOW_SGLANG_SRC")
    if env and (Path(env) / "sglang").is_dir():
        return Path(env)
    spec = importlib.util.find_spec("sglang")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent.parent
    for candidate in _CANDIDATES:
        if (Path(candidate) / "sglang").is_dir():
            return Path(candidate)
    return None


def module_tree(root: Path, module: str) -> ast.Module:
    path = root / (module.replace(".", "/") + ".py")
    return ast.parse(path.read_text(), filename=str(path))


def find_class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} not found")


def find_method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise LookupError(f"method {cls.name}.{name} not found")


def ast_signature_shape(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The same rendering as ``gate.signature_shape``, from source instead of a live function."""
    args = fn.args
    parts: list[str] = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(positional, defaults, strict=True):
        parts.append(arg.arg if default is None else f"{arg.arg}={_literal(default)}")
    if args.vararg is not None:
        parts.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        parts.append("*")
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        parts.append(arg.arg if default is None else f"{arg.arg}={_literal(default)}")
    if args.kwarg is not None:
        parts.append(f"**{args.kwarg.arg}")
    return "(" + ", ".join(parts) + ")"


def _literal(node: ast.expr) -> str:
    return repr(ast.literal_eval(node))


def class_fields(cls: ast.ClassDef) -> list[str]:
    """Annotated class-level names: a dataclass's fields, in order."""
    return [
        node.target.id
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    ]


def self_attributes(fn: ast.FunctionDef) -> set[str]:
    """Every ``self.X = ...`` (or annotated) assignment in a method body."""
    names: set[str] = set()
    for node in ast.walk(fn):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                names.add(target.attr)
    return names
