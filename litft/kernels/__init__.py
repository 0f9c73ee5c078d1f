"""GPU kernels of our own, written in Triton where a profile showed the compiler leaving time on the table; each has
a plain-torch twin that runs wherever Triton does not (CPU, float32) and that the tests compare it with."""
