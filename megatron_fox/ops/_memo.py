"""A one-entry cache keyed on a tensor object, for values derived from a micro-batch's
document offsets (cu_seqlens): every layer gets the same tensor, so the maps are built once
per micro-batch instead of once per layer (host time: the training loop is launch-bound at
16k-token micro-batches)."""

from __future__ import annotations

import functools
import weakref


def memo_on_first_tensor(fn):
    """Cache fn(t, *args) while t is the same, unmodified tensor object and args are equal.
    The last result only: a new micro-batch brings a new tensor and replaces it."""
    last = {"ref": None, "key": None, "value": None}

    @functools.wraps(fn)
    def wrapper(t, *args):
        if t is None:
            return fn(t, *args)
        key = (t._version, args)
        ref = last["ref"]
        if ref is not None and ref() is t and last["key"] == key:
            return last["value"]
        value = fn(t, *args)
        last.update(ref=weakref.ref(t), key=key, value=value)
        return value

    wrapper.cache_clear = lambda: last.update(ref=None, key=None, value=None)
    return wrapper
