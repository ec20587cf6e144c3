"""samtune: fine-tune Segment Anything on COCO-format data with PEFT, on HF accelerate."""

import logging
import warnings

# Messages from our dependencies that no samtune user can act on, silenced at their source (one message each;
# every other warning still shows):
# - bitsandbytes on CPUs with AVX512-BF16 offers an optional kernel package fetched from the hub, on every import;
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)
# - PEFT still calls transformers' gradient-checkpointing API by its old names.
warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
warnings.filterwarnings("ignore", r"`gradient_checkpointing_enable` is deprecated", FutureWarning)
