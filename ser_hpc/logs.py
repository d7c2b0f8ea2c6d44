"""Log set-up shared by the job entry points: timestamped lines on stderr, which Slurm
and submitit capture into the job's log file."""
import logging
import os
import warnings


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(level=(level or os.environ.get("SER_HPC_LOG", "INFO")).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Emitted on every forward of some frozen backbones (WavLM); it is about their code, not ours.
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
