"""``TokenizerManager.update_request_meta_info`` (sglang 0.5.23): expose the eviction stats as
``meta_info["vase"]`` (one dict, the latest), instead of SGLang's per-token accumulation.
"""

from sglang_vase.request_stats import KEY

TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
HOOK_TYPE = "AROUND"


def hook(original, self, meta_info, state, customized_info, index, *args, **kwargs):
    if KEY in customized_info:
        value = customized_info[KEY][index]
        if value is not None:
            meta_info[KEY] = value
        customized_info = {k: v for k, v in customized_info.items() if k != KEY}
    return original(self, meta_info, state, customized_info, index, *args, **kwargs)
