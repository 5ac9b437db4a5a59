"""Shared by the tools that walk a pickle's opcodes without running it (remap, scan)."""
from __future__ import annotations

import pickletools
from typing import Any, Callable, List


def generic_stack_effect(op: "pickletools.OpcodeInfo", stack: List[Any], mark: object,
                         pushed: Callable[[], Any]) -> None:
    """Apply the stack effect of an opcode a walker has no rule of its own for.

    Pops what ``op`` consumes (through its MARK when it takes a mark), then pushes one
    ``pushed()`` item per value it produces. Raises ValueError on a stack underflow.
    """
    before, after = op.stack_before, op.stack_after
    marks = [j for j, s in enumerate(before) if s is pickletools.markobject]
    if marks:
        if mark not in stack:
            raise ValueError(f"{op.name} without a MARK")
        k = len(stack) - 1 - stack[::-1].index(mark)
        del stack[k:]
        drop = marks[0]
    else:
        drop = len(before)
    if drop:
        if len(stack) < drop:
            raise ValueError("stack underflow")
        del stack[len(stack) - drop:]
    stack.extend(pushed() for _ in after)
