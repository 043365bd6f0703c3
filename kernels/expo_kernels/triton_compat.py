"""Work-arounds for differences between the Triton versions the kernels run on (3.6 to 3.9)."""
from __future__ import annotations


def fix_interpreter_index() -> None:
    """Make Triton 3.6's interpreter index with a scalar tensor under NumPy >= 2.4.

    The interpreter holds a scalar as a 1-element, 1-d array, and Triton 3.6 turns it into an int
    with int(array), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"): every `range` with a tensor bound fails. This re-patches `__index__` the way
    later Triton does (int(array.squeeze()), triton-lang/triton#9171), which is what it already is
    there. Only the interpreter is touched; compiled kernels never call it. Idempotent.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "expo_index_fix", False):
        return

    def patched(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.expo_index_fix = True
    interpreter._patch_lang_tensor = patched
