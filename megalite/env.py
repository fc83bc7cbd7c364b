"""`python -m megalite.env`: what this install can do, and why not where it cannot.

Prints torch and its build, the devices, the distributed backends, which compiled kernels
were built, and which implementation every op will use here (with the reason whenever it is
not the fastest one).
"""

import importlib.util
import os
import platform
import sys

import torch
import torch.distributed as dist


def _optional(name):
    spec = importlib.util.find_spec(name)
    if spec is None:
        return "not installed"
    try:
        mod = importlib.import_module(name)
        return getattr(mod, "__version__", "installed")
    except Exception as e:  # an installed but broken package: say so, don't crash the report
        return f"installed but fails to import ({type(e).__name__})"


def report() -> list[tuple[str, str]]:
    import megalite
    from megalite import ops
    from megalite.ops import dispatch

    rows = [
        ("megalite", f"{megalite.__version__} ({os.path.dirname(megalite.__file__)})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        (
            "cpu",
            f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads",
        ),
    ]
    if torch.cuda.is_available():
        # Per GPU, which kernels it gets: a GPU that none of the compiled code runs on (an arch
        # the install's nvcc did not build) takes the reference path; say so, and why.
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            impl, why = dispatch.cuda_device_path(i)
            path = "CUDA kernels" if impl == "cuda" else "reference kernels"
            rows.append(
                (
                    f"cuda:{i}",
                    f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}"
                    f" -> {path} ({why})",
                )
            )
    else:
        rows.append(
            ("cuda", "no CUDA device" if torch.version.cuda else "torch built without CUDA")
        )
    backends = []
    for name, ok in (
        ("gloo", dist.is_gloo_available()),
        ("nccl", dist.is_nccl_available()),
        ("mpi", dist.is_mpi_available()),
    ):
        backends.append(f"{name} {'yes' if ok else 'no'}")
    rows.append(("distributed", ", ".join(backends)))

    for mod, what in (("megalite._C", "C++ kernels"), ("megalite._cuda", "CUDA kernels")):
        rows.append((what, "built" if importlib.util.find_spec(mod) else "not built"))
    if dispatch._cuda is not None and hasattr(dispatch._cuda, "compiled_archs"):
        rows[-1] = ("CUDA kernels", "built for " + " ".join(dispatch._cuda.compiled_archs()))
    if os.environ.get("MEGALITE_KERNELS"):
        rows.append(("MEGALITE_KERNELS", os.environ["MEGALITE_KERNELS"]))
    for r in ops.kernel_report():
        rows.append((f"op {r['op']}", r["impl"] + (f"  ({r['reason']})" if r["reason"] else "")))

    for name in (
        "numpy",
        "sentencepiece",
        "tokenizers",
        "transformers",
        "tensorboard",
        "tqdm",
        "apex",
        "transformer_engine",
    ):
        rows.append((name, _optional(name)))
    return rows


def main():
    rows = report()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
