"""The ``--where`` expression language: comparisons, and / or / not, + - * /, numbers and strings over a table's
columns, parsed with ``ast`` into a pyarrow expression and never executed."""
from __future__ import annotations

import ast
from typing import Sequence

from evaclip.errors import UserError

_CMP = {ast.Lt: "less", ast.LtE: "less_equal", ast.Gt: "greater", ast.GtE: "greater_equal", ast.Eq: "equal",
        ast.NotEq: "not_equal"}
_ARITH = {ast.Add: "add", ast.Sub: "subtract", ast.Mult: "multiply", ast.Div: "divide"}
MAX_CHARS = 10_000


def parse_where(text: str, columns: Sequence[str]):
    """A pyarrow compute expression from a small, safe expression language (parsed with ``ast``, never run)."""
    import pyarrow.compute as pc

    if len(text) > MAX_CHARS:
        raise UserError(f"--where: {len(text)} characters; at most {MAX_CHARS}")
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise UserError(f"--where {text[:80]!r}: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise UserError(f"--where {text[:80]!r}...: nested too deeply") from None

    def conv(node):
        if isinstance(node, ast.BoolOp):
            parts = [conv(v) for v in node.values]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node.op, ast.And) else (out | p)
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~conv(node.operand)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return pc.negate(conv(node.operand))
        if isinstance(node, ast.Compare):
            out, left = None, conv(node.left)
            for op, right in zip(node.ops, node.comparators):
                if type(op) not in _CMP:
                    break
                r = conv(right)
                term = getattr(pc, _CMP[type(op)])(left, r)
                out = term if out is None else out & term
                left = r
            else:
                return out
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return getattr(pc, _ARITH[type(node.op)])(conv(node.left), conv(node.right))
        if isinstance(node, ast.Name):
            if node.id not in columns:
                raise UserError(f"--where {text!r}: no column {node.id!r} (columns: {', '.join(columns)})")
            return pc.field(node.id)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
            return pc.scalar(node.value)
        raise UserError(f"--where {text!r}: {ast.unparse(node)!r} is not allowed (columns, numbers, 'strings', "
                        "comparisons, and / or / not, + - * /)")

    boolean = isinstance(tree, (ast.BoolOp, ast.Compare)) or (
        isinstance(tree, ast.UnaryOp) and isinstance(tree.op, ast.Not)) or (
        isinstance(tree, ast.Constant) and isinstance(tree.value, bool))
    if not boolean:  # a number or a column would be cast to true/false row by row: keep everything, say nothing
        raise UserError(f"--where {text!r} is not a condition: compare a column (e.g. 'score > 0.25'), and combine "
                        "with and / or / not")
    try:
        return conv(tree)
    except RecursionError:
        raise UserError(f"--where {text[:80]!r}...: nested too deeply") from None
