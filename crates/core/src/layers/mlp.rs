//! Dense MLP: Nemotron-H's relu² (up → relu² → down, spec §2.5) and Llama's SwiGLU
//! (down(silu(gate) ⊙ up)). Budget: the first `ffn` intermediate channels.

use super::{Ffn, Observer, Scratch, add_bias, buf, linear_rows};
use crate::kernels::ops::{relu2, silu_mul};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Relu2,
    SwiGlu,
}

pub struct Mlp {
    pub up: Tensor,
    pub gate: Option<Tensor>,
    pub down: Tensor,
    pub act: Act,
    pub up_bias: Option<super::Vector>,
    pub gate_bias: Option<super::Vector>,
    pub down_bias: Option<super::Vector>,
}

impl Mlp {
    pub fn width(&self) -> usize {
        self.up.rows()
    }

    /// out[T, hidden] = MLP(x[T, hidden]) using the first `ffn` channels; the first `decode` rows
    /// are decode tokens (see [`linear_rows`]).
    pub fn forward(
        &self,
        ffn: usize,
        hidden: usize,
        x: &[f32],
        out: &mut [f32],
        decode: usize,
        s: &mut Scratch,
        obs: &mut dyn Observer,
        at: (usize, Ffn),
    ) {
        let t = x.len() / hidden;
        let rows = [0..ffn];
        let hid = [0..hidden];
        let u = buf(&mut s.d, t * ffn);
        if obs.enabled() {
            obs.weight_input(&self.up, &hid, x);
        }
        linear_rows(&self.up, &rows, &hid, x, u, decode);
        add_bias(&self.up_bias, &rows, u);
        match (&self.gate, self.act) {
            (Some(g), _) => {
                let gv = buf(&mut s.e, t * ffn);
                if obs.enabled() {
                    obs.weight_input(g, &hid, x);
                }
                linear_rows(g, &rows, &hid, x, gv, decode);
                add_bias(&self.gate_bias, &rows, gv);
                silu_mul(u, gv);
            }
            (None, Act::Relu2) => u.iter_mut().for_each(|v| *v = relu2(*v)),
            (None, Act::SwiGlu) => unreachable!("SwiGLU needs a gate"),
        }
        if obs.enabled() {
            obs.down_input(at.0, at.1, u, ffn);
        }
        if obs.enabled() {
            obs.weight_input(&self.down, &rows, u);
        }
        linear_rows(&self.down, &hid, &rows, u, out, decode);
        add_bias(&self.down_bias, &hid, out);
    }
}
