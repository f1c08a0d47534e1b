"""Model loading (local files only), tiny / mini / SD-size architectures, the offline tokenizer."""
from .architectures import ARCHITECTURES, SD_V1_SCHEDULE, architecture
from .loading import (MINI_PRIOR_DIR, ModelNotFoundError, SDComponents, build_random, load_clip_text, load_clip_vision,
                      load_diffusers_dir, load_dit_state_dict, load_ldm_dir, load_model, load_single_file)
from .tokenizer import add_placeholder_tokens, build_tokenizer, token_runs, tokenize

__all__ = ["ARCHITECTURES", "MINI_PRIOR_DIR", "ModelNotFoundError", "SDComponents", "SD_V1_SCHEDULE",
           "add_placeholder_tokens", "architecture", "build_random", "build_tokenizer", "load_clip_text",
           "load_clip_vision", "load_diffusers_dir", "load_dit_state_dict", "load_ldm_dir", "load_model", "load_single_file",
           "token_runs", "tokenize"]
