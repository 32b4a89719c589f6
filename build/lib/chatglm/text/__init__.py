"""Text: the SentencePiece tokenizer, the stream decoder, stop sequences and reply parsing."""
