"""What training, the build side and the run side share: numpy, Pillow and the standard library only.

errors (the user's errors, the CLI wrapper, exit codes), images (decoding files to pixels), files
(atomic writes), maths (the resize and blur matrices and the top-k count that the reference model,
the inference graph, the native code and the kernels all use). The run side owns this package;
training imports it, never the other way round.
"""
