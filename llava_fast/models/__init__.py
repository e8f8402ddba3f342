"""The LLaVA family in plain PyTorch: configs, towers, language models, checkpoint IO."""
from llava_fast.models.config import LlavaConfig, TextConfig, VisionConfig
from llava_fast.models.io import from_pretrained, load_state_dict, save_pretrained
from llava_fast.models.llava import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    LlavaOutput,
)
from llava_fast.models.llava import CLASSES as CLASSES_BY_TYPE

__all__ = ["LlavaConfig", "TextConfig", "VisionConfig", "from_pretrained", "save_pretrained", "load_state_dict",
           "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
           "LlavaOnevisionForConditionalGeneration", "LlavaOutput", "CLASSES_BY_TYPE"]
