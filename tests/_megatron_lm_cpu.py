"""Test launcher: ``torchrun tests/_megatron_lm_cpu.py PRETRAIN_SCRIPT.py FLAGS`` runs the plug-in's ``main`` on CPU.

It first stands in for what Megatron-LM's training package assumes about CUDA (test-only, nothing
in Megatron-LM is edited): the project's megatron-core CPU shims, plus, each for a reason found in
Megatron-LM core_v0.16.1's training code:

- ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda``;
- ``_compile_dependencies`` builds fused CUDA kernels;
- ``_warmup_jit_function`` warms the fused kernels on ``torch.rand(..., device="cuda")`` inputs:
  redirected to the CPU they would draw from the generator that then initializes the weights,
  in sizes that depend on the TP size (and compile with inductor);
- ``_initialize_distributed`` builds the model-parallel groups only when ``device_count() > 0``;
- ``validate_args`` calls ``get_device_arch_version`` (``torch.cuda.get_device_properties``) at
  TP>1: 0, no CUDA architecture (only Megatron-LM's function is replaced: torch's inductor also
  reads the device properties);
- ``get_model`` wraps the model in DDP inside a CUDA side stream, the checkpoint saves the CUDA
  RNG state, and the memory report reads CUDA memory counters;
- the model-parallel RNG tracker is seeded from ``--seed`` like ``model_parallel_cuda_manual_seed``.
"""
from __future__ import annotations

import contextlib

import torch


class _Stream:
    def wait_stream(self, other) -> None:
        pass


def _stand_in_for_cuda() -> None:
    from megatron.core import parallel_state as ps

    from disco_megatron.runtime import install_cpu_shims
    from disco_megatron.runtime.cpu_shims import seed_rng_tracker

    install_cpu_shims()
    import megatron.training.arguments as arguments
    import megatron.training.initialize as init_module
    import megatron.training.training as training
    from megatron.training import get_args

    arguments.get_device_arch_version = lambda: 0
    torch.cuda.Stream = torch.cuda.current_stream = lambda *a, **k: _Stream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(torch.cuda, name, lambda *a, **k: 0)
    init_module._compile_dependencies = init_module._warmup_jit_function = lambda: None
    initialize_distributed = init_module._initialize_distributed

    def initialize_distributed_and_groups(*args, **kwargs):
        initialize_distributed(*args, **kwargs)
        margs = get_args()
        ps.initialize_model_parallel(margs.tensor_model_parallel_size, margs.pipeline_model_parallel_size)

    init_module._initialize_distributed = initialize_distributed_and_groups
    initialize_megatron = training.initialize_megatron

    def initialize_megatron_on_cpu(*args, **kwargs):
        result = initialize_megatron(*args, **dict(kwargs, allow_no_cuda=True))
        seed_rng_tracker(get_args().seed, ps.get_tensor_model_parallel_rank())
        return result

    training.initialize_megatron = initialize_megatron_on_cpu


if __name__ == "__main__":
    _stand_in_for_cuda()
    from disco_megatron.integrations.megatron_lm import main
    from disco_megatron.runtime.parallel import live_gloo_threads

    main()
    if leftover := live_gloo_threads():  # fail every time, not at random when the exit aborts
        raise SystemExit(f"{len(leftover)} gloo threads outlived the plug-in's teardown: a process group "
                         "is still referenced (see runtime.parallel._release_megatron_state)")
