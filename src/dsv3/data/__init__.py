"""Data: the DeepSeek-V3 tokenizer and chat template, Megatron `.bin/.idx` datasets,
`dsv3 preprocess`, GPT samples equal to megatron-core's, a resumable loader, WikiText-2.

Modules (import what you need; nothing heavy is imported here):
  tokenizer      load_tokenizer(path) -> Tokenizer (encode/decode/chat template/streaming decode)
  chat_template  render_chat(messages) (the V3 template in Python)
  indexed_dataset IndexedDatasetBuilder / IndexedDataset (Megatron MMIDIDX v1, byte-exact)
  preprocess     the `dsv3 preprocess` verb and `preprocess(...)`
  gpt_dataset    GPTDatasetConfig, build_gpt_datasets(cfg, num_samples) -> (train, valid, test)
  gpt_indices    split parsing and the document/sample/shuffle indices of gpt_dataset (and their cache)
  blended        weighted blending (BlendedDataset)
  loader         ResumableLoader (in-order batches, state_dict/load_state_dict)
  wikitext       find_wikitext(path) and the WikiText -> paragraph documents conversion
"""
