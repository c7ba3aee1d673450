"""Test-only stand-in for `sgl_kernel` on CPU machines. Never installed by the package: tools/envs.py puts this folder
on the path of the CPU test venv only. SGLang imports `sgl_kernel` at module level even when it then runs its torch
native backend; the CUDA/CPU builds of the real package are not on PyPI for this machine. Any attribute is a function
that raises, so a code path that really needs a kernel fails loudly instead of computing something wrong."""


class KernelNotAvailable(RuntimeError):
    pass


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def unavailable(*args, **kwargs):
        raise KernelNotAvailable(f"sgl_kernel.{name} was called, but this is the CPU test shim; "
                                 "install the real sglang-kernel on a GPU machine")

    unavailable.__name__ = name
    return unavailable
