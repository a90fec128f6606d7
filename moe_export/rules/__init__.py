"""One module per gate form; each defines RULE (a patterns.Rule) and may set ORDER (rules are
tried in ORDER, the first that takes a TopK wins). patterns.rules() finds them all."""
