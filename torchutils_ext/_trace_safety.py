"""Is a torch.fx graph a proof for every input, or only for the input the trace imitated?

torch.fx runs forward() with proxies in place of the inputs. Control flow that asks a proxy for a value
(``if y.sum() > 0``, ``if x.shape[-1] > 8``) stops the trace, which is safe. But some questions a proxy answers
silently, and then the trace records one branch while another input would take the other:
``if mask is None``, ``isinstance(x, dict)``, ``type(x)``, ``hasattr(x, ...)``; an argument given its default in the
trace but not in a real call; state that forward() itself writes (a grid built on the first call); a global switch
such as ``is_fx_tracing()``; an exception caught. A graph used to fold layers must hold for every input, so this
module reads the source of the code the trace ran (every non-leaf module's forward, and the helpers they call
through ``self`` or by name) and refuses the graph when any branch condition could differ between the trace and
a real call.

A condition is trusted when it reads only constants, globals and the module's own attributes that no analysed
code writes, and calls only ``isinstance``/``hasattr``/``getattr``/``len``/``callable``/``type`` on such values or
``torch.jit.is_scripting``/``is_tracing``/``torch.compiler.is_compiling``. ``self.training`` is module state: the
fold holds in the mode the model is in (a BatchNorm in training mode is never folded). Code in torch itself is
trusted. Not followed: callables reached through containers or other objects (their calls are checked by fx when
they are modules); a function without source makes the answer "not proven".
"""
from __future__ import annotations

import ast
import inspect
import os
import textwrap
import types

import torch
import torch.fx as fx

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PURE = {'isinstance', 'hasattr', 'getattr', 'len', 'callable', 'type', 'issubclass'}
# answers about a proxy that fx gives without complaint (len() of a proxy raises; of a list the code built, it is
# fixed by that code)
_SILENT = {'isinstance', 'type', 'id', 'callable', 'hasattr', 'getattr', 'issubclass'}
_TRUSTED_CALLS = {('torch', 'jit', 'is_scripting'), ('torch', 'jit', 'is_tracing'), ('torch', 'compiler',
                                                                                     'is_compiling')}
_SOURCES: dict = {}  # code object -> (FunctionDef/Lambda node, parameter names) or None


def has_proxy(value, depth=0) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if depth < 3 and isinstance(value, (list, tuple)):
        return any(has_proxy(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return any(has_proxy(v, depth + 1) for v in value.values())
    return False


def _trusted(fn) -> bool:
    code = getattr(fn, '__code__', None)
    return code is None or code.co_filename.startswith(_TORCH_DIR)


def _parse(code):
    if code in _SOURCES:
        return _SOURCES[code]
    got = None
    try:
        lines, start = inspect.getsourcelines(code)
        tree = ast.parse(textwrap.dedent(''.join(lines)))
        ast.increment_lineno(tree, start - 1)  # report the file's line numbers
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == code.co_name:
                got = node
                break
    except (OSError, TypeError, SyntaxError, IndentationError):
        got = None
    _SOURCES[code] = got
    return got


def _names(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _self_attrs(node, self_name) -> set:
    return {n.attr for n in ast.walk(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == self_name}


def _dotted(node):
    """('torch', 'jit', 'is_scripting') for torch.jit.is_scripting, or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return (node.id, *reversed(parts))
    return None


def _targets(node, self_name) -> set:
    """The names an assignment to ``node`` binds or fills: a name, the names of a tuple, the container of an item
    or attribute written (``out[i] = y`` makes ``out`` hold y); never the module itself (its attributes written
    are tracked as state, see ``writes``)."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, (ast.Tuple, ast.List)):
        return set().union(*(_targets(e, self_name) for e in node.elts)) if node.elts else set()
    if isinstance(node, ast.Starred):
        return _targets(node.value, self_name)
    if isinstance(node, (ast.Subscript, ast.Attribute)):
        base = node.value
        while isinstance(base, (ast.Subscript, ast.Attribute)):
            base = base.value
        return {base.id} if isinstance(base, ast.Name) and base.id != self_name else set()
    return set()


class _Function:
    """One analysed function: its taint (names that may hold or derive from a proxy), conditions and calls."""

    def __init__(self, fn, tree, tainted_params):
        self.fn, self.tree = fn, tree
        args = tree.args
        params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
        self.self_name = params[0] if params and inspect.ismethod(fn) else None
        self.tainted = set(tainted_params)
        if args.vararg is not None and args.vararg.arg in tainted_params:
            self.tainted.add(args.vararg.arg)
        self._spread()

    def _spread(self):
        """Flow-insensitive: a name assigned from an expression that reads a tainted name is tainted."""
        flows = []
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Assign):
                flows += [(t, n.value) for t in n.targets]
            elif isinstance(n, (ast.AugAssign, ast.AnnAssign)) and n.value is not None:
                flows.append((n.target, n.value))
            elif isinstance(n, (ast.For, ast.comprehension)):
                flows.append((n.target, n.iter))
            elif isinstance(n, ast.withitem) and n.optional_vars is not None:
                flows.append((n.optional_vars, n.context_expr))
            elif isinstance(n, ast.NamedExpr):
                flows.append((n.target, n.value))
        for n in ast.walk(self.tree):  # xs.append(y), xs.extend(ys), d.update(...): xs now holds y
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                    and n.func.value.id != self.self_name):
                flows.append((n.func.value, n))
        changed = True
        while changed:
            changed = False
            for target, value in flows:
                if _names(value) & self.tainted:
                    new = _targets(target, self.self_name) - self.tainted
                    if new:
                        self.tainted |= new
                        changed = True

    def writes(self) -> set:
        """Attributes of the module this function assigns (lazily built state)."""
        if self.self_name is None:
            return set()
        out = set()
        for n in ast.walk(self.tree):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(
                n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                out |= {a.attr for a in ast.walk(t) if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name)
                        and a.value.id == self.self_name}
        return out

    def conditions(self):
        for n in ast.walk(self.tree):
            if isinstance(n, (ast.If, ast.While, ast.IfExp)):
                yield n.test
            elif isinstance(n, ast.comprehension):
                yield from n.ifs
            elif isinstance(n, ast.BoolOp):
                yield from n.values[:-1]  # each decides whether the next is evaluated
            elif isinstance(n, ast.Match):
                yield n.subject

    def problem(self, written) -> str | None:
        where = f'{self.fn.__qualname__} ({inspect.getsourcefile(self.fn) or "?"})'
        for n in ast.walk(self.tree):
            if isinstance(n, ast.Try):
                return f'{where} catches exceptions, which may depend on the input'
            if isinstance(n, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot)) for op in n.ops):
                if _names(n) & self.tainted:
                    return f'{where} compares its input by identity (line {n.lineno}: is / is not)'
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _SILENT:
                if any(_names(a) & self.tainted for a in (*n.args, *(k.value for k in n.keywords))):
                    return f'{where} asks {n.func.id}() about its input (line {n.lineno})'
        for cond in self.conditions():
            if _names(cond) & self.tainted:
                return f'{where} branches on its input (line {cond.lineno})'
            if self.self_name and _self_attrs(cond, self.self_name) & written:
                return f'{where} branches on state its own code writes (line {cond.lineno})'
            for call in (c for c in ast.walk(cond) if isinstance(c, ast.Call)):
                name = _dotted(call.func)
                if name is None or not (name in _TRUSTED_CALLS or (len(name) == 1 and name[0] in _PURE)):
                    return f'{where} calls {ast.unparse(call.func)}() to decide a branch (line {cond.lineno})'
        return None

    def callees(self):
        """(function, tainted parameter names) for the calls this function makes through self or by name."""
        glob = getattr(self.fn, '__globals__', {})
        owner = getattr(self.fn, '__self__', None)
        for call in (c for c in ast.walk(self.tree) if isinstance(c, ast.Call)):
            target = self._resolve(call.func, owner, glob)
            if target is None or _trusted(target) or isinstance(target, torch.nn.Module):
                continue  # builtins and torch; modules are traced (fx checks their calls)
            yield target, self._arg_taint(target, call)

    def _resolve(self, func, owner, glob):
        name = _dotted(func)
        if name is None:
            return None
        if self.self_name and name[0] == self.self_name and owner is not None and len(name) == 2:
            if name[1] in getattr(owner, '_modules', {}):
                return None  # a submodule: traced by fx
            try:
                obj = inspect.getattr_static(owner, name[1])
            except AttributeError:
                return None
            if isinstance(obj, (staticmethod, classmethod)):
                obj = obj.__func__
            if not inspect.isfunction(obj):
                return None
            # a function stored on the instance is called as is; one from the class is a method
            return obj if name[1] in getattr(owner, '__dict__', {}) else types.MethodType(obj, owner)
        builtins = __builtins__ if isinstance(__builtins__, dict) else vars(__builtins__)
        obj = glob.get(name[0], builtins.get(name[0]))
        for part in name[1:]:
            obj = getattr(obj, part, None)
        return obj if (inspect.isfunction(obj) or inspect.ismethod(obj)) else None

    def _arg_taint(self, target, call) -> set:
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return set()
        params = list(sig.parameters.values())
        tainted = set()
        spread = any(isinstance(a, ast.Starred) and _names(a) & self.tainted for a in call.args) or any(
            k.arg is None and _names(k.value) & self.tainted for k in call.keywords)
        if spread:
            return {p.name for p in params}
        for p, a in zip(params, call.args):
            if _names(a) & self.tainted:
                tainted.add(p.name)
        for k in call.keywords:
            if k.arg is not None and _names(k.value) & self.tainted:
                tainted.add(k.arg)
        return tainted


def why_not_a_proof(executed) -> str | None:
    """``executed``: (forward function, the names of its parameters that held proxies) for the root and every
    non-leaf module the trace ran. None when every branch the code can take is decided the same way for every
    input; else the first reason it is not."""
    todo, seen, done = list(executed), set(), []
    while todo:
        fn, tainted = todo.pop()
        if _trusted(fn):
            continue
        key = (fn.__code__, frozenset(tainted), id(getattr(fn, '__self__', None)))
        if key in seen:
            continue
        seen.add(key)
        tree = _parse(fn.__code__)
        if tree is None:
            return f'the source of {getattr(fn, "__qualname__", fn)} cannot be read'
        f = _Function(fn, tree, tainted)
        done.append(f)
        todo.extend(f.callees())
    written = set().union(*(f.writes() for f in done)) if done else set()
    for f in done:
        why = f.problem(written)
        if why:
            return why
    return None


def proxy_params(fn, args, kwargs) -> set:
    """The parameter names of ``fn`` bound to values that hold a proxy in this call (all of them when the call
    cannot be matched to the signature)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set()
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return set(sig.parameters)
    return {name for name, value in bound.arguments.items() if has_proxy(value)}
