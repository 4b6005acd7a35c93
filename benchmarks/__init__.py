"""Side-by-side benchmarks, sdjax vs diffusers/PyTorch, on the same random weights: `python -m benchmarks.run`."""
