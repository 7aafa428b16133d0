"""rayfleet's kernels: import this folder as `rayfleet.kernels`, never as top-level `kernels`.

`kernels` is also the name of Hugging Face's kernel-hub package, which transformers (5.25 on)
installs and imports. This folder becomes reachable under that top-level name whenever the
checkout's root is on `sys.path`: `python -m ...` or pytest started from it, and every Ray
worker of a driver started there (Ray adds the driver's working directory to its workers'
path). It would then shadow the installed package and break transformers' imports. So, loaded
under that name, this file hands the name over to the installed distribution.
"""

if __name__ == "kernels":
    import importlib.metadata
    import importlib.util
    import sys
    from pathlib import Path

    try:
        _dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"{__file__} is rayfleet's kernels folder (import it as rayfleet.kernels), "
            "and no `kernels` package is installed"
        ) from None
    _init = Path(str(_dist.locate_file("kernels/__init__.py")))
    _spec = importlib.util.spec_from_file_location(
        "kernels", _init, submodule_search_locations=[str(_init.parent)]
    )
    if _spec is None or _spec.loader is None or not _init.is_file():
        raise ImportError(f"the installed `kernels` package has no {_init}")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what `import kernels` returns once this file is done
    _spec.loader.exec_module(_module)
