"""lgemma's Gradio demo: `variants` (find, load, answer, explain; no Gradio) and `demo` (the app)."""
