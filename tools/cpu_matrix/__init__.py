"""The CPU matrix check (`make test-cpus`): the int8 guard under emulated CPUs."""
