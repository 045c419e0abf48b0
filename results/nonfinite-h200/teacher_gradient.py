# The teacher alone (no mixture): max |dL/dx| at each layer's input, L = mean log-softmax of one random 2048-token batch.
# python teacher_gradient.py /tmp/qwen2.5-3b-random (one H200, 2026-11-28); a one-off, kept as it ran.
import torch, sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).cuda()
m.requires_grad_(False)
ids = torch.randint(0, 150000, (1, 2048), device="cuda")
h = m.model.embed_tokens(ids).detach().requires_grad_()
acts, grads = [], []
def hook(mod, args, kwargs):
    x = args[0] if args else kwargs["hidden_states"]
    acts.append(float(x.float().pow(2).mean().sqrt()))
    x.register_hook(lambda g: grads.append(float(g.float().abs().max())))
for l in m.model.layers:
    l.register_forward_pre_hook(hook, with_kwargs=True)
out = m(inputs_embeds=h).logits.float()
out.log_softmax(-1).mean().backward()
grads = grads[::-1]
for i, (a, g) in enumerate(zip(acts, grads)):
    print(f"layer {i:2d} input rms {a:.3g}  max|dL/dx| {g:.3g}")
print("embedding init std", float(m.model.embed_tokens.weight.float().std()), "final norm w", float(m.model.norm.weight.float().mean()))
