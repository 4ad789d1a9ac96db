"""One module per tab: each ``build(demo)`` lays its tab out in the current ``gr.Blocks`` and wires it."""
