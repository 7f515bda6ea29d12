"""`hspace explore`: interpret, name and compose h-space directions in a local web app.

``session`` holds the logic (testable without a browser), ``app`` the gradio page and the command.
"""
