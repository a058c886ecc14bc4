//! The optimizer side of training, as torch and HF define it: AdamW (`torch.optim.AdamW`,
//! decoupled weight decay), global-norm gradient clipping (`clip_grad_norm_`), and HF's
//! learning-rate schedules with warmup (`get_cosine_schedule_with_warmup` and friends).
//!
//! candle-nn's `AdamW` computes the same update but keeps its moments private, so they could
//! not be checkpointed; this one exposes them.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use candle_core::{DType, Tensor, Var};

use crate::train::config::Scheduler;

/// The learning-rate multiplier at `step` (0-based count of updates done), as HF's lambdas.
pub fn lr_lambda(kind: Scheduler, step: usize, warmup: usize, total: usize) -> f64 {
    let (s, w, t) = (step as f64, warmup as f64, total as f64);
    if step < warmup && kind != Scheduler::Constant {
        return s / w.max(1.0);
    }
    match kind {
        Scheduler::Cosine => {
            let progress = (s - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
        Scheduler::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
        Scheduler::Constant | Scheduler::ConstantWithWarmup => 1.0,
    }
}

/// HF's `get_warmup_steps`: `warmup_steps` if set, else `ceil(warmup_ratio * max_steps)`.
pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, max_steps: usize) -> usize {
    if warmup_steps > 0 {
        warmup_steps
    } else {
        (warmup_ratio * max_steps as f64).ceil() as usize
    }
}

/// The global L2 norm of `grads`, as `clip_grad_norm_` computes it: each gradient's norm in
/// f32, then the norm of those. One read back for all of them: a read back per gradient made
/// the device wait 256 times a step on Falcon-7B.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all()?.sqrt())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = Tensor::stack(&norms, 0)?.sqr()?.sum_all()?.sqrt()?;
    Ok(f64::from(total.to_scalar::<f32>()?))
}

/// What `clip_grad_norm_` scales every gradient by for a global norm of `norm` (the
/// [`global_norm`] before clipping, which HF logs as `grad_norm`): `max_norm / (norm + 1e-6)`
/// when that is below 1 (and `max_norm` is set), else nothing. The trainer hands it to
/// [`AdamW::step`], which scales each gradient as it reads it.
pub fn clip_coefficient(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    (max_norm > 0.0 && coef < 1.0).then_some(coef)
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// `torch.optim.AdamW` over named variables, with its state (`exp_avg`, `exp_avg_sq`, step).
pub struct AdamW {
    pub params: AdamWParams,
    pub step: u64,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(mut vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let zeros = |v: &Var| {
            v.as_tensor()
                .zeros_like()
                .and_then(|t| t.to_dtype(DType::F32))
        };
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            step: 0,
            vars,
            m,
            v,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The end of an optimizer step: the gradients' global norm (returned, as HF logs it), the
    /// clipping coefficient for `max_norm` ([`clip_coefficient`]), and the update at `lr`. On a
    /// GPU with f32 weights, the norm and the update take three launches in all
    /// ([`adapterlab_model::engine::MultiTensorStep`]); elsewhere [`global_norm`] then
    /// [`Self::step`].
    pub fn clip_and_step(&mut self, grads: &[Tensor], max_norm: f64, lr: f64) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if let Some(norm) = self.multi_tensor_step(grads, max_norm, lr)? {
            return Ok(norm);
        }
        let norm = global_norm(grads)?;
        self.step(grads, clip_coefficient(norm, max_norm), lr)?;
        Ok(norm)
    }

    /// [`Self::clip_and_step`] through the multi-tensor kernels, or `None` (nothing done) where
    /// a weight is not an f32 tensor on the GPU.
    #[cfg(feature = "cuda")]
    fn multi_tensor_step(
        &mut self,
        grads: &[Tensor],
        max_norm: f64,
        lr: f64,
    ) -> Result<Option<f64>> {
        let eligible = !self.vars.is_empty()
            && self.vars.iter().zip(grads).all(|((_, v), g)| {
                v.device().is_cuda() && v.dtype() == DType::F32 && g.dtype() == DType::F32
            });
        if !eligible || grads.len() != self.vars.len() {
            return Ok(None);
        }
        let params: Vec<Tensor> = self
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect();
        let grads = grads
            .iter()
            .map(|g| g.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let table =
            adapterlab_model::engine::MultiTensorStep::new(&params, &grads, &self.m, &self.v)?;
        // clip_grad_norm_'s total: the norm of the per-tensor norms, in f32.
        let norms = table.grad_norms()?;
        let norm = f64::from(norms.iter().map(|n| n * n).sum::<f32>().sqrt());
        self.step += 1;
        table.adamw(&self.scalars(lr, clip_coefficient(norm, max_norm)))?;
        Ok(Some(norm))
    }

    /// The update's scalars at the current step count.
    #[cfg(feature = "cuda")]
    fn scalars(&self, lr: f64, grad_scale: Option<f64>) -> adapterlab_model::engine::AdamWScalars {
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        adapterlab_model::engine::AdamWScalars {
            beta1,
            beta2,
            eps,
            decay: (weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
            bc2_sqrt: (1.0 - beta2.powi(self.step as i32)).sqrt(),
            step: lr / (1.0 - beta1.powi(self.step as i32)),
            grad_scale,
        }
    }

    /// One update with `grads[i]` for `vars()[i]`, each scaled by `grad_scale` first where given
    /// (clipping's coefficient: on a GPU inside the update's kernel, without a launch of its
    /// own), at learning rate `lr`: `p ← p(1 − lr·wd)`, then `p ← p − lr/bc1 · m /
    /// (sqrt(v)/sqrt(bc2) + eps)`.
    pub fn step(&mut self, grads: &[Tensor], grad_scale: Option<f64>, lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        for (i, ((_, var), g)) in self.vars.iter().zip(grads).enumerate() {
            let g = g.to_dtype(DType::F32)?;
            #[cfg(feature = "cuda")]
            if var.device().is_cuda() && var.dtype() == DType::F32 {
                // The same update in one kernel, rounded alike (golden test
                // `adamw_kernel_equals_the_op_by_op_update`).
                let scalars = self.scalars(lr, grad_scale);
                let (p, m, v) = adapterlab_model::engine::adamw_f32(
                    var.as_tensor(),
                    &g.contiguous()?,
                    &self.m[i],
                    &self.v[i],
                    &scalars,
                )?;
                var.set(&p)?;
                self.m[i] = m;
                self.v[i] = v;
                continue;
            }
            let g = match grad_scale {
                Some(c) => (g * c)?,
                None => g,
            };
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let p = if weight_decay != 0.0 {
                (p * (1.0 - lr * weight_decay))?
            } else {
                p
            };
            let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
            let p = (p - ((&m / denom)? * (lr / bc1))?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The state as tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.m[i].clone()));
            out.push((format!("exp_avg_sq.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restore what [`Self::state_tensors`] saved.
    pub fn load_state(&mut self, mut tensors: BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        let device = self.vars.first().map(|(_, v)| v.device().clone());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let mut take = |key: String| -> Result<Tensor> {
                let t = tensors
                    .remove(&key)
                    .with_context(|| format!("optimizer state has no {key}"))?;
                Ok(match &device {
                    Some(d) => t.to_device(d)?,
                    None => t,
                })
            };
            self.m[i] = take(format!("exp_avg.{name}"))?;
            self.v[i] = take(format!("exp_avg_sq.{name}"))?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn schedules_follow_hf() {
        // get_cosine_schedule_with_warmup(opt, 2, 10): lambdas at steps 0..=10.
        let got: Vec<f64> = (0..=10)
            .map(|s| lr_lambda(Scheduler::Cosine, s, 2, 10))
            .collect();
        let want = [
            0.0,
            0.5,
            1.0,
            0.9619397662556434,
            0.8535533905932737,
            0.6913417161825449,
            0.5,
            0.3086582838174551,
            0.14644660940672627,
            0.03806023374435663,
            0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!(close(*g, w), "{got:?}");
        }
        // get_linear_schedule_with_warmup(opt, 2, 10).
        assert!(close(lr_lambda(Scheduler::Linear, 1, 2, 10), 0.5));
        assert!(close(lr_lambda(Scheduler::Linear, 6, 2, 10), 0.5));
        assert!(close(lr_lambda(Scheduler::Linear, 10, 2, 10), 0.0));
        assert!(close(lr_lambda(Scheduler::Constant, 0, 2, 10), 1.0));
        assert!(close(
            lr_lambda(Scheduler::ConstantWithWarmup, 1, 2, 10),
            0.5
        ));
        assert_eq!(warmup_steps(0, 0.01, 250), 3);
        assert_eq!(warmup_steps(7, 0.5, 250), 7);
    }

    #[test]
    fn clipping_scales_to_max_norm_and_reports_the_pre_clip_norm() {
        let dev = Device::Cpu;
        let g = vec![
            Tensor::new(&[3f32, 0.0], &dev).unwrap(),
            Tensor::new(&[[4f32]], &dev).unwrap(),
        ];
        let n = global_norm(&g).unwrap();
        assert!(close(n, 5.0));
        let coef = clip_coefficient(n, 1.0).expect("a norm above the max is clipped");
        let clipped: Vec<Tensor> = g.iter().map(|t| (t * coef).unwrap()).collect();
        let after = global_norm(&clipped).unwrap();
        assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{after}");
        let g = vec![Tensor::new(&[0.3f32, 0.4], &dev).unwrap()];
        let n = global_norm(&g).unwrap();
        assert!((n - 0.5).abs() < 1e-6);
        assert_eq!(clip_coefficient(n, 1.0), None, "no clipping below the max");
        assert_eq!(
            clip_coefficient(5.0, 0.0),
            None,
            "no clipping without a max"
        );
    }

    /// A step given clipping's coefficient is the step on the gradients scaled by it.
    #[test]
    fn a_scaled_step_is_the_step_on_scaled_gradients() {
        let dev = Device::Cpu;
        let run = |g: [f32; 2], scale: Option<f64>| {
            let var = Var::new(&[1f32, -2.0], &dev).unwrap();
            let params = AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            };
            let mut opt = AdamW::new(vec![("p".into(), var.clone())], params).unwrap();
            opt.step(&[Tensor::new(&g, &dev).unwrap()], scale, 0.1)
                .unwrap();
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        let c = 0.37f64;
        let scaled = [0.5f32, -0.1].map(|x| x * c as f32);
        assert_eq!(run([0.5, -0.1], Some(c)), run(scaled, None));
    }

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.01), p = [1, -2], two steps with
        // grads [0.5, 0.1] then [-0.2, 0.3]; expected values from the torch formula by hand.
        let dev = Device::Cpu;
        let var = Var::new(&[1f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("p".into(), var.clone())],
            AdamWParams {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
            },
        )
        .unwrap();
        let grads = [[0.5f64, 0.1], [-0.2, 0.3]];
        let (mut p, mut m, mut v) = ([1f64, -2.0], [0f64; 2], [0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            opt.step(
                &[Tensor::new(&[g[0] as f32, g[1] as f32], &dev).unwrap()],
                None,
                0.1,
            )
            .unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                p[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                p[i] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((f64::from(got[i]) - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
        // State round-trips.
        let saved: BTreeMap<String, Tensor> = opt.state_tensors().into_iter().collect();
        let mut other = AdamW::new(vec![("p".into(), var)], opt.params).unwrap();
        other.load_state(saved, opt.step).unwrap();
        assert_eq!(
            other.m[0].to_vec1::<f32>().unwrap(),
            opt.m[0].to_vec1::<f32>().unwrap()
        );
    }
}
