"""The ``llama-steer`` command-line programs, built on the library's public API only.

    cli ....... llama-steer (steered generation, --show-grid) and the subcommand dispatch
    chat ...... llama-steer chat (interactive, /commands)
    demo ...... llama-steer demo (the main job on the embedded model)
    look ...... llama-steer look (where the heads look: an overlay PNG)
    score ..... llama-steer score (gaze heads -> a headmap)
    evaluate .. llama-steer eval (the paper's experiments)

The library (``llama_steer`` and its modules outside this package) imports nothing from here.
"""
