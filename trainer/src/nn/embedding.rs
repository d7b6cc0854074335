//! Embedding lookups.

use candle_core::{Shape, Tensor};

use super::flat2;
use crate::tape::{attach, trainable};
use crate::{Error, Result};

/// The sum of several embedding lookups (`ids` u32, `table` `(vocab, d)`), as one node that
/// scatters gradients into the trainable tables only.
pub fn embedding_sum(lookups: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let mut value: Option<Tensor> = None;
    for (ids, table) in lookups {
        let flat = ids.flatten_all()?;
        let e = table.detach().index_select(&flat, 0)?;
        let mut dims = ids.dims().to_vec();
        dims.push(table.dim(1)?);
        let e = e.reshape(dims)?;
        value = Some(match value {
            Some(v) => (v + e)?,
            None => e,
        });
    }
    let value = value.ok_or_else(|| Error::Config {
        field: "embedding_sum".into(),
        message: "no lookups given".into(),
    })?;
    let saved: Vec<(Tensor, Option<Shape>)> = lookups
        .iter()
        .map(|(ids, table)| {
            Ok((
                ids.flatten_all()?,
                trainable(table).then(|| table.shape().clone()),
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let parents: Vec<&Tensor> = lookups.iter().map(|(_, t)| *t).collect();
    attach(&parents, value, move |g| {
        let (g2, _) = flat2(g)?;
        saved
            .iter()
            .map(|(ids, shape)| match shape {
                Some(s) => Ok(Some(
                    Tensor::zeros(s, g2.dtype(), g2.device())?.index_add(ids, &g2, 0)?,
                )),
                None => Ok(None),
            })
            .collect()
    })
}
