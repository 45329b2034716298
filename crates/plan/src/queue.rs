//! Queueing formulas the sizing uses: Erlang C for how long a request waits for a free slot in a pool of
//! slots (M/M/c), and Poisson quantiles for how many spot workers are down at once.

/// Probability that an arrival waits, with `servers` slots and offered load `a` = rate x service time
/// (Erlang C); 1 when the load reaches the slots. Computed through Erlang B's recursion, which stays
/// stable for hundreds of thousands of slots.
pub fn erlang_c(servers: u64, a: f64) -> f64 {
    if servers == 0 || a >= servers as f64 {
        return 1.0;
    }
    if a <= 0.0 {
        return 0.0;
    }
    let mut b = 1.0;
    for k in 1..=servers {
        b = a * b / (k as f64 + a * b);
    }
    let rho = a / servers as f64;
    b / (1.0 - rho + rho * b)
}

/// The `q` quantile of the wait for a slot (seconds), with `servers` slots each holding a request for
/// `service_s` seconds on average and arrivals at `rate`: M/M/c's exponential tail past the chance of
/// waiting at all. Infinite when the slots cannot keep up.
pub fn wait_quantile(servers: u64, rate: f64, service_s: f64, q: f64) -> f64 {
    let capacity = servers as f64 / service_s;
    if rate >= capacity {
        return f64::INFINITY;
    }
    let waits = erlang_c(servers, rate * service_s);
    let tail = 1.0 - q;
    if waits <= tail {
        return 0.0;
    }
    (waits / tail).ln() / (capacity - rate)
}

/// The smallest k with P(Poisson(mean) <= k) >= q.
pub fn poisson_quantile(mean: f64, q: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 500.0 {
        // Normal approximation with continuity correction; the sums below would underflow.
        let z = normal_quantile(q);
        return (mean + z * mean.sqrt() + 0.5).ceil().max(0.0) as u64;
    }
    let mut p = (-mean).exp();
    let mut cdf = p;
    let mut k = 0;
    while cdf < q && k < 100_000 {
        k += 1;
        p *= mean / k as f64;
        cdf += p;
    }
    k
}

/// The standard normal quantile (Acklam's rational approximation, error below 1e-8 in the middle).
#[allow(clippy::excessive_precision)] // The published coefficients, as published.
pub fn normal_quantile(q: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.383577518672690e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    let q = q.clamp(1e-12, 1.0 - 1e-12);
    let tail = |p: f64| {
        let r = (-2.0 * p.ln()).sqrt();
        (((((C[0] * r + C[1]) * r + C[2]) * r + C[3]) * r + C[4]) * r + C[5])
            / ((((D[0] * r + D[1]) * r + D[2]) * r + D[3]) * r + 1.0)
    };
    if q < 0.02425 {
        tail(q)
    } else if q > 1.0 - 0.02425 {
        -tail(1.0 - q)
    } else {
        let r = q - 0.5;
        let s = r * r;
        (((((A[0] * s + A[1]) * s + A[2]) * s + A[3]) * s + A[4]) * s + A[5]) * r
            / (((((B[0] * s + B[1]) * s + B[2]) * s + B[3]) * s + B[4]) * s + 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_c_matches_known_values() {
        // One server: the chance of waiting is the utilization.
        assert!((erlang_c(1, 0.7) - 0.7).abs() < 1e-12);
        // A textbook call-centre case: 10 agents, 8 Erlangs -> 0.409.
        assert!((erlang_c(10, 8.0) - 0.4092).abs() < 1e-3, "{}", erlang_c(10, 8.0));
        assert_eq!(erlang_c(4, 4.0), 1.0);
        // Large pools stay finite and below 1.
        let big = erlang_c(200_000, 199_000.0);
        assert!(big > 0.0 && big < 1.0, "{big}");
    }

    #[test]
    fn the_wait_quantile_grows_with_load_and_is_zero_when_waiting_is_rare() {
        assert_eq!(wait_quantile(100, 10.0, 1.0, 0.99), 0.0);
        let light = wait_quantile(8, 6.0, 1.0, 0.99);
        let heavy = wait_quantile(8, 7.5, 1.0, 0.99);
        assert!(light < heavy && heavy.is_finite(), "{light} {heavy}");
        assert!(wait_quantile(8, 8.0, 1.0, 0.99).is_infinite());
        // M/M/1 at utilization 0.5 and service 1 s: P(W > t) = 0.5 exp(-0.5 t) -> t99 = 2 ln 50.
        assert!((wait_quantile(1, 0.5, 1.0, 0.99) - 2.0 * 50f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn poisson_and_normal_quantiles() {
        assert_eq!(poisson_quantile(0.0, 0.99), 0);
        assert_eq!(poisson_quantile(1.0, 0.99), 4);
        assert_eq!(poisson_quantile(10.0, 0.5), 10);
        assert!((normal_quantile(0.99) - 2.3263).abs() < 1e-4);
        assert!((normal_quantile(0.5)).abs() < 1e-9);
        let big = poisson_quantile(10_000.0, 0.99);
        assert!((10_200..=10_250).contains(&big), "{big}");
    }
}
