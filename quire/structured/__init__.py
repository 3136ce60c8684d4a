"""Structured output: constrained decoding with a grammar engine, and tool-call parsing.

- ``params``: ``StructuredOutputsParams``, what a request asks for (a JSON schema, any JSON object,
  a regex, a choice of strings, or a Lark/EBNF grammar). Torch-free and dependency-free: it crosses
  the API -> engine wire inside ``SamplingParams``.
- the grammar backend (llguidance) behind a small registry, and the runner's hook that computes
  the batch's token bitmasks while the forward runs.
- ``tool_parsers``: model output formats for tool calls (``--tool-call-parser``), one file each.
"""
