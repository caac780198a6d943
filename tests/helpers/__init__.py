"""Code shared by the tests (no tests here): tiny-config arguments, data writers, probes, the SLURM harness."""
