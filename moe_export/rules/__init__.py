"""Gate forms: base.py holds the Rule and Gate types and the matchers rules share; every other
module is one gate form, defining RULE (a base.Rule) and optionally ORDER (rules are tried in
ORDER, the first that takes a TopK wins). base.rules() finds them all."""
