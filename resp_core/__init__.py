"""RESP: self-reflective structured pruning for reasoning language models."""

import importlib.abc as _abc
import importlib.util as _util
import sys as _sys

from .hookspecs import hookimpl, hookspec

__version__ = "0.1.0"

__all__ = ["hookimpl", "hookspec", "load_pruned", "__version__"]


def load_pruned(path, dtype=None, device=None):
    """Load a pruned model saved by RESP (see :func:`resp_core.model.pruned_model.load_pruned`)."""
    from .model.pruned_model import load_pruned as _load

    return _load(path, dtype=dtype, device=device)


# Compacted folders have their own model types (``resp_pruned_<base>``), registered with
# transformers' AutoConfig / AutoModelForCausalLM.  ``import resp_core`` must not import
# transformers (the CLI starts in a fraction of a second), so the registration runs when
# transformers is imported: now if it already is, else right after its own import finishes.

def _register_with_transformers() -> None:
    if "resp_core.model.pruned_model" in _sys.modules:
        return  # it is being imported (and imports transformers): it registers at its end
    try:
        from .model.pruned_model import register_auto_classes

        register_auto_classes()
    except Exception as exc:  # noqa: BLE001 - never break transformers' import
        import warnings

        warnings.warn(f"RESP could not register its pruned model types with transformers: {exc}", stacklevel=2)


class _AfterTransformersImport(_abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        _sys.meta_path.remove(self)  # one shot; the real finders locate the package
        spec = _util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_with_transformers()

        loader.exec_module = exec_then_register
        return spec


if "transformers" in _sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterTransformersImport) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _AfterTransformersImport())
