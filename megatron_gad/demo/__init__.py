"""The bundled tiny GAD task ("dyck"): a program teacher, a tiny tokenizer and a tiny Llama student.

Everything is generated locally, so the demo runs on a laptop CPU without downloads.
"""
