"""Log set-up shared by the job entry points: timestamped lines on stderr, which Slurm
and submitit capture into the job's log file."""
import logging
import os
import sys
import warnings


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(level=(level or os.environ.get("SER_HPC_LOG", "INFO")).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Emitted on every forward of some frozen backbones (WavLM); it is about their code, not ours.
    warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
    # transformers draws a "Loading weights" bar per model: carriage-return noise in job logs.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()
    else:  # read when huggingface_hub / transformers are imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
