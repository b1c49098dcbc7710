"""Names of the files in checkpoint and model folders that mwakit reads or writes."""

#: Files of a full model that travel with the merged weights (from the base, else the first).
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
