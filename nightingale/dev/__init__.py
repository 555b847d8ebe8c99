"""Development-only code: what tests, benchmarks and the fixture tools use, never the runtime.

- checkpoint.py: random checkpoints in the upstream layouts (`nightingale dev make-checkpoint`);
- torchsave.py: the torch.save writer (models/torchpickle.py is the reader the runtime uses);
- metrics.py: fidelity measures (SNR, log-spectral distance, sample jumps);
- cli.py: the `nightingale dev` command.

Nothing in models/, daemon/, client/ or the top-level nightingale modules imports this
package (tests/test_dev.py checks it).
"""
