"""For correctness runs on a cold GPU machine: PYTHONPATH=tests/quick_autotune pytest -m gpu ...

Triton autotunes each kernel on its first call by compiling and timing every config; fla's RWKV-7 kernels, for which
no configs ship (fla_configs/), spent over 5 minutes of a 10-minute call doing so. This keeps the 2 configs with the
fewest pipeline stages (then closest to 4 warps): the ones that fit shared memory on any GPU. A kernel's result does
not depend on its config beyond rounding; its speed does, so never time anything with this on the path."""
try:
    from triton.runtime.autotuner import Autotuner
except ImportError:  # no triton (CPU): nothing to prune
    pass
else:
    _prune_configs = Autotuner.prune_configs

    def prune_configs(self, kwargs, *args, **kw):
        configs = _prune_configs(self, kwargs, *args, **kw)
        return sorted(configs, key=lambda c: (c.num_stages, abs(c.num_warps - 4)))[:2]

    Autotuner.prune_configs = prune_configs
