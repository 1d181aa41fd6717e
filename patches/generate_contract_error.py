"""``api_contract.generate_contract_error`` (sglang 0.5.23; http_server imports it): a top-level
``custom_params`` on ``/generate`` is a 400 that points to ``sampling_params.custom_params``.

SGLang's ``/generate`` drops unknown top-level fields, so ``{"custom_params": {"vase": ...}}``
there would silently run with the server's defaults (the OpenAI routes do take it at the top
level). SGLang answers a contract error with a 400 and ``{"error": message}``.
"""

TARGET = "sglang.srt.entrypoints.api_contract.generate_contract_error"
HOOK_TYPE = "AFTER"
ALWAYS = True


def hook(result, body, *args, **kwargs):
    if result is None and isinstance(body, dict) and "custom_params" in body:
        return ("custom_params is a sampling parameter on /generate: send it as "
                "sampling_params.custom_params (top-level custom_params is for the OpenAI routes)")
    return result
