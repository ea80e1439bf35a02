"""peftkit: parameter-efficient fine-tuning for PyTorch and transformers models, with 🤗 PEFT's API and files.

Importing peftkit imports torch but not transformers (that happens when a transformers model is used).
"""

from __future__ import annotations

from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .config import PEFTKIT_VERSION, PeftConfig
from .errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterMismatchError,
    AdapterNotFoundError,
    ConfigError,
    GroupedConvMergeError,
    MergeError,
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    ShapeMismatchError,
    UnsupportedModuleError,
)
from .helpers import (
    cast_mixed_precision_params,
    get_base_model_state_dict,
    set_base_model_state_dict,
    shift_tokens_right,
)
from .hotswap import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
from .layers import AdapterLayer, ModulesToSaveWrapper
from .mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
    get_peft_model,
    inject_adapter_in_model,
)
from .methods.adalora import AdaLoraConfig, AdaLoraStepHook, attach_adalora
from .methods.boft import BOFTConfig
from .methods.c3a import C3AConfig
from .methods.delora import DeloraConfig
from .methods.fourierft import FourierFTConfig
from .methods.glora import GloraConfig
from .methods.gralora import GraloraConfig
from .methods.hira import HiraConfig
from .methods.hra import HRAConfig
from .methods.ia3 import IA3Config
from .methods.lily import LilyConfig
from .methods.ln_tuning import LNTuningConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import LoraConfig
from .methods.lora.arrow import ArrowConfig, create_arrow_model
from .methods.lora.bdlora import BdLoraConfig
from .methods.lora.config import LoraRuntimeConfig
from .methods.lora.conversion import convert_to_lora, save_as_lora
from .methods.lora.corda import CordaConfig, preprocess_corda
from .methods.lora.eva import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights
from .methods.lora.kasa import KasaConfig
from .methods.lora.loftq import LoftQConfig, replace_lora_weights_loftq
from .methods.lora.loraga import LoraGAConfig, preprocess_loraga
from .methods.lora.monteclora import MontecloraConfig
from .methods.lora.velora import VeloraConfig
from .methods.miss import MissConfig
from .methods.oft import OFTConfig
from .methods.osf import OSFConfig
from .methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from .methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .methods.prompt import PromptLearningConfig
from .methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit
from .methods.psoft import PsoftConfig
from .methods.pvera import PveraConfig
from .methods.randlora import RandLoraConfig
from .methods.road import RoadConfig
from .methods.shira import ShiraConfig
from .methods.tinylora import TinyLoraConfig
from .methods.trainable_tokens import TrainableTokensConfig
from .methods.unilora import UniLoraConfig
from .methods.vblora import VBLoRAConfig
from .methods.vera import VeraConfig
from .methods.waveft import WaveFTConfig
from .mixed_model import PeftMixedModel
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from .quantization import QuantizedMergeReport, QuantizedMergeWarning, prepare_model_for_kbit_training
from .registry import MethodSpec, all_methods, get_method, register_method
from .serialization.files import load_peft_weights
from .serialization.state_dict import get_peft_model_state_dict, set_peft_model_state_dict
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .tuner import TunerModel, tuner_class
from .types import PeftType, TaskType

__version__ = PEFTKIT_VERSION

#: the reference's name for the base class of adapter layers
BaseTunerLayer = AdapterLayer
LoraModel = tuner_class("LORA")
IA3Model = tuner_class("IA3")
LoHaModel = tuner_class("LOHA")
VeraModel = tuner_class("VERA")
PveraModel = tuner_class("PVERA")
OFTModel = tuner_class("OFT")
LoKrModel = tuner_class("LOKR")
AdaLoraModel = tuner_class("ADALORA")
BOFTModel = tuner_class("BOFT")
TrainableTokensModel = tuner_class("TRAINABLE_TOKENS")
PsoftModel = tuner_class("PSOFT")
OSFModel = tuner_class("OSF")
HRAModel = tuner_class("HRA")
MissModel = tuner_class("MISS")
RoadModel = tuner_class("ROAD")
RandLoraModel = tuner_class("RANDLORA")
ShiraModel = tuner_class("SHIRA")
VBLoRAModel = tuner_class("VBLORA")
UniLoraModel = tuner_class("UNILORA")
TinyLoraModel = tuner_class("TINYLORA")
GraloraModel = tuner_class("GRALORA")
LNTuningModel = tuner_class("LN_TUNING")
FourierFTModel = tuner_class("FOURIERFT")
LilyModel = tuner_class("LILY")
WaveFTModel = tuner_class("WAVEFT")
C3AModel = tuner_class("C3A")
HiraModel = tuner_class("HIRA")
DeloraModel = tuner_class("DELORA")
GloraModel = tuner_class("GLORA")


def __getattr__(name: str) -> object:
    """``AdaLoraCallback`` (a transformers ``TrainerCallback``) is built on first use, importing transformers."""
    if name == "AdaLoraCallback":
        from .methods.adalora import training

        return training.AdaLoraCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdaLoraStepHook",
    "AdapterExistsError",
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterMismatchError",
    "AdapterNotFoundError",
    "ArrowConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BOFTConfig",
    "BOFTModel",
    "BaseTunerLayer",
    "BdLoraConfig",
    "C3AConfig",
    "C3AModel",
    "ConfigError",
    "CordaConfig",
    "DeloraConfig",
    "DeloraModel",
    "EvaConfig",
    "FourierFTConfig",
    "FourierFTModel",
    "GloraConfig",
    "GloraModel",
    "GraloraConfig",
    "GraloraModel",
    "GroupedConvMergeError",
    "HRAConfig",
    "HRAModel",
    "HiraConfig",
    "HiraModel",
    "IA3Config",
    "IA3Model",
    "KasaConfig",
    "LNTuningConfig",
    "LNTuningModel",
    "LilyConfig",
    "LilyModel",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoftQConfig",
    "LoraConfig",
    "LoraGAConfig",
    "LoraModel",
    "LoraRuntimeConfig",
    "MergeError",
    "MethodSpec",
    "MissConfig",
    "MissModel",
    "ModulesToSaveWrapper",
    "MontecloraConfig",
    "NoMatchingPeftModuleError",
    "OFTConfig",
    "OFTModel",
    "OSFConfig",
    "OSFModel",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "PromptTuningInit",
    "PsoftConfig",
    "PsoftModel",
    "PveraConfig",
    "PveraModel",
    "QuantizedMergeReport",
    "QuantizedMergeWarning",
    "RandLoraConfig",
    "RandLoraModel",
    "RoadConfig",
    "RoadModel",
    "ShapeMismatchError",
    "ShiraConfig",
    "ShiraModel",
    "TaskType",
    "TinyLoraConfig",
    "TinyLoraModel",
    "TrainableTokensConfig",
    "TrainableTokensModel",
    "TunerLayerStatus",
    "TunerModel",
    "TunerModelStatus",
    "UniLoraConfig",
    "UniLoraModel",
    "UnsupportedModuleError",
    "VBLoRAConfig",
    "VBLoRAModel",
    "VeloraConfig",
    "VeraConfig",
    "VeraModel",
    "WaveFTConfig",
    "WaveFTModel",
    "__version__",
    "all_methods",
    "attach_adalora",
    "cast_mixed_precision_params",
    "convert_to_lora",
    "create_arrow_model",
    "get_base_model_state_dict",
    "get_eva_state_dict",
    "get_layer_status",
    "get_method",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "preprocess_loraga",
    "register_method",
    "replace_lora_weights_loftq",
    "save_as_lora",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]
