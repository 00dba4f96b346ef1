"""The measurements, one module each; :mod:`benchmarks.run` decides which run, in what order."""
