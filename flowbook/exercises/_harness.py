"""The machinery every checker shares: running labelled checks in order, turning a student's mistake into
one clear message, naming known mistakes, and switching off the flowbook code an exercise re-implements."""
from __future__ import annotations

import contextlib
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.functional import jacobian
from torch.overrides import TorchFunctionMode

_PACKAGE = str(Path(__file__).resolve().parents[1])


class CheckFailed(Exception):
    """A check failed. In a notebook it shows its message only: no traceback into the checker."""

    def _render_traceback_(self):  # IPython shows these lines instead of a traceback
        return [f"\x1b[31m{self}\x1b[0m"]


class Delegated(Exception):
    """The student's code called the flowbook code the exercise asks them to write."""


class _Fail(Exception):
    pass


def expect(cond, message):
    """Fail the current check with `message` unless `cond`."""
    if not cond:
        raise _Fail(message)


def max_error(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def close(a, b, what, atol=1e-6):
    """Fail unless tensor `a` has b's shape and is within `atol` of it."""
    expect(isinstance(a, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(a).__name__}")
    expect(a.shape == b.shape, f"{what}: expected shape {list(b.shape)}, got {list(a.shape)}")
    err = max_error(a, b)
    expect(err <= atol, f"{what}: off by up to {err:.3g} (tolerance {atol:g})")


def is_close(a, b, atol=1e-6) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and max_error(a, b) <= atol


def diagnose(got, right, mistakes: dict, atol=1e-6):
    """Fail with the hint of the first known mistake whose result `got` reproduces (unless `got` is `right`).

    mistakes: {hint: value or zero-argument function returning what that mistake computes}. These are a
    checker's mistake-specific tests: with hints switched off (`grade(..., hints=False)`) they do not run, and
    the check that follows them fails with its general message instead."""
    if is_close(got, right, atol) or not _HINTS[0]:
        return
    for hint, value in mistakes.items():
        if callable(value):
            try:
                with reference():
                    value = value()
            except Exception:  # this mistake cannot even be computed for these inputs
                continue
        if is_close(got, value, atol):
            raise _Fail(hint)


def logdet(fn, x):
    """log|det J| of fn at one example x (no batch dimension), from autograd; fn maps [1, ...] to [1, ...]."""
    jac = jacobian(lambda v: fn(v.unsqueeze(0)).flatten(), x)
    return torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1]


def layer_logdets(layer, z):
    """[B] log|det J| of a flow layer `layer(z, ldj) -> (z', ldj')` at each example of z [B, ...], from
    autograd, computed with the switched-off reference code available (see `reference`)."""
    zero = torch.zeros(1, dtype=z.dtype)
    with reference():
        return torch.stack([logdet(lambda v: layer(v, zero)[0], zb) for zb in z])


def perturbed(module, scale=0.3, seed=0):
    """`module` with every parameter moved away from its (often zero) initialisation, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


_HINTS = [True]  # False while grade(..., hints=False) runs: diagnose() names no mistake


@contextlib.contextmanager
def _hints(on: bool):
    before, _HINTS[0] = _HINTS[0], on
    try:
        yield
    finally:
        _HINTS[0] = before


# Switching off flowbook's own code ----------------------------------------------------------------------

_ORIGINALS: dict = {}  # key -> original callable, while a block is active
_REFERENCE = [0]  # > 0 while the checker itself computes reference values


@contextlib.contextmanager
def reference():
    """Inside, blocked flowbook code works again: the checker computes its expected values."""
    _REFERENCE[0] += 1
    try:
        yield
    finally:
        _REFERENCE[0] -= 1


def _call(key, args, kwargs):
    if _REFERENCE[0] or key not in _ORIGINALS:
        return _ORIGINALS[key](*args, **kwargs)
    raise Delegated(f"your code called {key}, which this exercise switches off while your code is checked: "
                    "implement this yourself")


_STUB_FILE = "<switched off by flowbook.exercises>"


def _stub_code(name, key, freevars=()):
    """Code for a function `name` that calls _call(key, ...), with the same free variables as the code it
    replaces (a method that uses super() has one, __class__), so that it can take that code's place."""
    cells = "".join(f"    {v} = None\n" for v in freevars)
    uses = f"        ({', '.join(freevars)},)\n" if freevars else ""
    src = (f"def _outer():\n{cells}"
           f"    def {name}(*args, **kwargs):\n{uses}"
           f"        import flowbook.exercises._harness as _h\n"
           f"        return _h._call({key!r}, args, kwargs)\n"
           f"    return {name}\n")
    scope = {}
    exec(compile(src, _STUB_FILE, "exec"), scope)
    return scope["_outer"]().__code__


def _swap_code(target, key, undo):
    """Switch off the Python function `target` in place: every reference to it, including one a student
    captured before the check (`_borrowed = CouplingLayer.forward`), now calls the stub."""
    code = target.__code__
    if code.co_filename == _STUB_FILE:  # already switched off (the same function named twice)
        return
    stub = _stub_code(target.__name__, key, code.co_freevars)
    if stub.co_freevars != code.co_freevars:  # cannot happen for the targets flowbook blocks; be safe
        raise RuntimeError(f"cannot switch off {key}: free variables {code.co_freevars}")
    _ORIGINALS[key] = types.FunctionType(code, target.__globals__, target.__name__, target.__defaults__,
                                         target.__closure__)
    _ORIGINALS[key].__kwdefaults__ = target.__kwdefaults__
    target.__code__ = stub
    undo.append(lambda t=target, c=code, k=key: (setattr(t, "__code__", c), _ORIGINALS.pop(k)))


class _BlockTorch(TorchFunctionMode):
    """Switches off torch's own (C) functions however they are reached: through torch.linalg.slogdet, an
    alias such as torch.slogdet, or a reference captured before the check (`_sld = torch.linalg.slogdet`)."""

    def __init__(self, functions: dict):
        super().__init__()
        self.functions = functions  # the callable -> its name

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if not _REFERENCE[0] and func in self.functions:
            raise Delegated(f"your code called {self.functions[func]}, which this exercise switches off while your "
                            "code is checked: implement this yourself")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def blocked(targets):
    """Switch off `targets` (Python functions, or (owner, attribute) pairs for methods and torch functions):
    calling one raises Delegated, except inside `reference()`. A Python function or method is switched off in
    place (its code is swapped), so a reference to it captured earlier is switched off too; a torch function
    is also caught by a torch function mode, so an alias or a captured reference cannot reach it.
    Everything is restored afterwards."""
    undo, torch_functions = [], {}
    try:
        for target in targets:
            if isinstance(target, types.FunctionType):
                _swap_code(target, target.__qualname__, undo)
                continue
            owner, attr = target
            key = f"{getattr(owner, '__name__', owner)}.{attr}"
            if owner is torch.Tensor:  # a tensor method (w.det()): caught by the mode alone, torch.Tensor untouched
                torch_functions[getattr(owner, attr)] = key
                continue
            original = owner.__dict__[attr] if attr in getattr(owner, "__dict__", {}) else getattr(owner, attr)
            if isinstance(original, types.FunctionType):
                _swap_code(original, key, undo)
                continue
            torch_functions[getattr(owner, attr)] = key
            _ORIGINALS[key] = getattr(owner, attr)

            def stub(*args, _key=key, **kwargs):
                return _call(_key, args, kwargs)

            setattr(owner, attr, stub)
            undo.append(lambda o=owner, a=attr, v=original, k=key: (setattr(o, a, v), _ORIGINALS.pop(k)))
        if torch_functions:
            with _BlockTorch(torch_functions):
                yield
        else:
            yield
    finally:
        for restore in reversed(undo):
            restore()


# Modules built during a check ---------------------------------------------------------------------------

_BUILDING = [0]  # how many building() blocks have started


@contextlib.contextmanager
def building():
    """Inside, every torch module created is stamped with this block's number (see `built_here`)."""
    original = torch.nn.Module.__init__
    _BUILDING[0] += 1
    stamp = _BUILDING[0]

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        object.__setattr__(self, "_flowbook_built", stamp)

    torch.nn.Module.__init__ = init
    try:
        yield stamp
    finally:
        torch.nn.Module.__init__ = original


def built_here(module, stamp) -> list:
    """The names of the submodules of `module` not created inside the building() block `stamp` (a copy or
    a reload of a model made earlier keeps its old stamp, or none)."""
    return [name or "the model" for name, m in module.named_modules() if m.__dict__.get("_flowbook_built") != stamp]


# Running the checks -------------------------------------------------------------------------------------

@dataclass
class Check:
    label: str
    run: callable


def _where(err) -> str:
    """' (line N of your code)' for the innermost frame of the student's code in err's traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(_PACKAGE) and "/torch/" not in f.filename]
    if not frames:
        return ""
    name = frames[-1].filename
    place = "your cell" if name.startswith("<") or "ipykernel_" in name else Path(name).name
    return f" (line {frames[-1].lineno} of {place})"


def run_checks(name: str, checks, blocks=()) -> None:
    """Run `checks` ([(label, function)]) in order with `blocks` switched off. Prints one line when all pass;
    raises CheckFailed with the first failure's message otherwise. A stub's
    NotImplementedError passes through (tests and "Run All" expect it), shown in a notebook as one line."""
    checks = [Check(*c) for c in checks]
    for i, check in enumerate(checks, 1):
        where = f"{name}: check {i}/{len(checks)} ({check.label})"
        try:
            with blocked(blocks):
                check.run()
        except NotImplementedError as err:  # a stub not yet written: one line, like every other message
            err._render_traceback_ = lambda e=err, w=where: [f"\x1b[31m✗ {w}: your code raised NotImplementedError: "
                                                             f"{e} (the exercise is not done yet)\x1b[0m"]
            raise
        except _Fail as fail:
            raise CheckFailed(f"✗ {where} failed: {fail}") from None
        except Delegated as err:
            raise CheckFailed(f"✗ {where}: {err}") from None
        except Exception as err:  # the student's code crashed: say where and how
            raise CheckFailed(f"✗ {where}: your code raised {type(err).__name__}{_where(err)}: {err}") from None
    print(f"✓ {name}: all {len(checks)} checks passed")


# Grading -----------------------------------------------------------------------------------------------

_PASSED_WITHOUT_HINTS: list = []  # (checker, args) that passed grade(..., hints=False); the objects kept alive


def grade(*parts, hints: bool = True) -> float:
    """The points an exercise earns, for an autograder test cell: each part, `(points, checker, *args)`, earns
    its points when `checker(*args)` passes, and none otherwise (so an exercise in separable parts gets partial
    credit). Never raises for the student's code: each part prints its checker's line (a failure's message, or
    the stub's NotImplementedError), everything the code writes to stderr goes to stdout (nbgrader gives no
    points to a test cell with output on stderr), and the total is returned (nbgrader takes a test cell's
    returned number as its score). `hints=False` runs the checks without their mistake-specific tests (see
    `diagnose`): a wrong answer still fails, with the general message of the check. Those tests only name a
    mistake that a check fails anyway, so a part that passed without them, on the same objects in this
    kernel, passes with them and is not run again (chapter 3's training check takes a minute)."""
    earned, total = 0.0, 0.0
    with contextlib.redirect_stderr(sys.stdout), _hints(hints):
        for points, checker, *args in parts:
            total += points
            name = getattr(checker, "__name__", "the check")
            if hints and any(c is checker and len(a) == len(args) and all(x is y for x, y in zip(a, args))
                             for c, a in _PASSED_WITHOUT_HINTS):
                print(f"✓ {name}: passed above (the hidden tests only add the name of a mistake to a failed check)")
                earned += points
                continue
            try:
                checker(*args)
            except NotImplementedError as err:
                said = f": {err}" if str(err) else ""
                print(f"✗ {name}: your code raised NotImplementedError{said} (the exercise is not done yet)")
            except CheckFailed as err:
                print(err)
            except Exception as err:  # anything a checker does not turn into CheckFailed is still the student's
                print(f"✗ {name}: your code raised {type(err).__name__}{_where(err)}: {err}")
            else:
                earned += points
                if not hints:
                    _PASSED_WITHOUT_HINTS.append((checker, args))
                continue
            print(f"  0 of {points:g} points for {name}")
    print(f"{earned:g} of {total:g} points" + ("" if hints else " in the checks you see (the grader runs more)"))
    return earned
