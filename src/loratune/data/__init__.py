"""Data: raw rows -> Conversation (sources) -> rendered text (templates) -> tokens + answer mask (tokenize)."""
