"""Tool calling: how tools reach the prompt (tool_prompt.py), how tool_choice named/required is
enforced with a grammar (tool_choice.py), and how a model's text is read back as calls
(parsers/, chosen with --tool-call-parser)."""
