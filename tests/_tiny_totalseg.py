"""Small nnU-Net v2 result folders with random weights, in nnU-Net's / TotalSegmentator's layout.

``make_result_folder`` writes ``<root>/DatasetNNN_Name/<Trainer>__nnUNetPlans__3d_fullres/``
with ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth`` (a
state dict of a tiny PlainConvUNet from ``_tiny_nnunet.TINY_PLAIN_UNET``, seeded
random weights). ``make_totalseg_home`` lays out TotalSegmentator's weights
folder (``<home>/nnunet/results``) with its five 1.5 mm part datasets and the
3 mm ``total`` dataset, each with TotalSegmentator's own class list (its ids and names).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from _tiny_nnunet import TINY_PLAIN_UNET

RESAMPLE = "resample_data_or_seg_to_shape"

#: part -> (dataset id, dataset folder name, class names): TotalSegmentator's own part
#: class maps (``totalsegmentator.map_to_binary.class_map_5_parts``, v2.18.0), so the
#: folders mean the same with and without the ``totalsegmentator`` package installed
TOTALSEG_PARTS = {
    "organs": (291, "Dataset291_TotalSegmentator_part1_organs_1559subj",
        ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
         "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left",
         "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
         "lung_lower_lobe_right", "esophagus", "trachea", "thyroid_gland", "small_bowel",
         "duodenum", "colon", "urinary_bladder", "prostate", "kidney_cyst_left",
         "kidney_cyst_right"]),
    "vertebrae": (292, "Dataset292_TotalSegmentator_part2_vertebrae_1532subj",
        ["sacrum", "vertebrae_S1", "vertebrae_L5", "vertebrae_L4", "vertebrae_L3", "vertebrae_L2",
         "vertebrae_L1", "vertebrae_T12", "vertebrae_T11", "vertebrae_T10", "vertebrae_T9",
         "vertebrae_T8", "vertebrae_T7", "vertebrae_T6", "vertebrae_T5", "vertebrae_T4",
         "vertebrae_T3", "vertebrae_T2", "vertebrae_T1", "vertebrae_C7", "vertebrae_C6",
         "vertebrae_C5", "vertebrae_C4", "vertebrae_C3", "vertebrae_C2", "vertebrae_C1"]),
    "cardiac": (293, "Dataset293_TotalSegmentator_part3_cardiac_1559subj",
        ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
         "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
         "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
         "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein",
         "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right"]),
    "muscles": (294, "Dataset294_TotalSegmentator_part4_muscles_1559subj",
        ["humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
         "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "spinal_cord",
         "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
         "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
         "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain",
         "skull"]),
    "ribs": (295, "Dataset295_TotalSegmentator_part5_ribs_1559subj",
        ["rib_left_1", "rib_left_2", "rib_left_3", "rib_left_4", "rib_left_5", "rib_left_6",
         "rib_left_7", "rib_left_8", "rib_left_9", "rib_left_10", "rib_left_11", "rib_left_12",
         "rib_right_1", "rib_right_2", "rib_right_3", "rib_right_4", "rib_right_5", "rib_right_6",
         "rib_right_7", "rib_right_8", "rib_right_9", "rib_right_10", "rib_right_11",
         "rib_right_12", "sternum", "costal_cartilages"]),
}

#: TotalSegmentator's two MR part class maps (``class_map_parts_mr``): organs, muscles
TOTALSEG_MR_PARTS = (
    ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
     "adrenal_gland_right", "adrenal_gland_left", "lung_left", "lung_right", "esophagus",
     "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate", "sacrum", "vertebrae",
     "intervertebral_discs", "spinal_cord", "heart", "aorta", "inferior_vena_cava",
     "portal_vein_and_splenic_vein", "iliac_artery_left", "iliac_artery_right",
     "iliac_vena_left", "iliac_vena_right"],
    ["humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
     "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right",
     "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
     "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right", "autochthon_left",
     "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain"],
)


def plans_dict(name, spacing, patch, normalization="CTNormalization", transpose=(0, 1, 2),
               features=(4, 8, 16), probabilities_kwargs=None):
    """A 3d_fullres plans.json for a 3-stage PlainConvUNet."""
    arch = copy.deepcopy(TINY_PLAIN_UNET)
    arch["arch_kwargs"]["features_per_stage"] = list(features)
    back = [int(i) for i in np.argsort(transpose)]
    prob_kw = probabilities_kwargs or {"is_seg": False, "order": 1, "order_z": 0,
                                       "force_separate_z": None}
    return {
        "dataset_name": name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose),
        "transpose_backward": back, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 1500.0, "mean": 90.0, "median": 60.0, "min": -1000.0,
            "percentile_00_5": -900.0, "percentile_99_5": 1200.0, "std": 310.0}},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [64, 64, 64],
            "spacing": list(spacing), "normalization_schemes": [normalization],
            "use_mask_for_norm": [False], "resampling_fn_data": RESAMPLE,
            "resampling_fn_seg": RESAMPLE, "resampling_fn_probabilities": RESAMPLE,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                          "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                         "force_separate_z": None},
            "resampling_fn_probabilities_kwargs": prob_kw,
            "architecture": arch, "batch_dice": False}},
    }


def make_result_folder(root, dataset, class_names, spacing=(1.5, 1.5, 1.5), patch=(16, 16, 16),
                       trainer="nnUNetTrainer", folds=(0,), seed=0, mirror_axes=(0, 1, 2),
                       channel="CT", background_bias=0.0, **plans_kw) -> Path:
    """Write one result folder with random-weight networks; return its path.

    ``background_bias`` is added to the background output's bias, so that a
    network with many classes still leaves most voxels to background.
    """
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = plans_dict(dataset, spacing, patch, **plans_kw)
    labels = {"background": 0, **{n: i + 1 for i, n in enumerate(class_names)}}
    ds = {"channel_names": {"0": channel}, "labels": labels, "numTraining": 3,
          "file_ending": ".nii.gz", "name": dataset}
    folder = Path(root) / dataset / f"{trainer}__nnUNetPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(ds))
    cm = PlansManager(plans).get_configuration("3d_fullres")
    for i, f in enumerate(folds):
        torch.manual_seed(seed * 100 + i)
        net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 1, len(labels),
                                     deep_supervision=False)
        with torch.no_grad():  # spread the logits so most voxels are far from ties
            for p in net.parameters():
                p.mul_(1.5)
            net.decoder.seg_layers[-1].bias[0] += background_bias
        ckpt = {"network_weights": net.state_dict(), "optimizer_state": None,
                "grad_scaler_state": None, "current_epoch": 1,
                "logging": {"train_losses": [np.float64(0.5)]}, "_best_ema": np.float64(0.5),
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": f,
                              "dataset_json": ds},
                "trainer_name": trainer,
                "inference_allowed_mirroring_axes": None if mirror_axes is None
                else tuple(mirror_axes)}
        (folder / f"fold_{f}").mkdir()
        torch.save(ckpt, folder / f"fold_{f}" / "checkpoint_final.pth")
    return folder


def make_totalseg_home(home, parts=True, fast=True, mr=False, part_bias=6.0) -> Path:
    """TotalSegmentator's weights folder layout under ``home``; return ``home``.

    ``part_bias``: background bias of the five part models, so that each part
    claims only some voxels and classes of several parts survive the merge.
    """
    results = Path(home) / "nnunet" / "results"
    results.mkdir(parents=True, exist_ok=True)
    all_names = []
    for i, (part, (tid, dname, names)) in enumerate(TOTALSEG_PARTS.items()):
        all_names += names
        if parts:
            make_result_folder(results, dname, names, spacing=(1.5, 1.5, 1.5),
                               patch=(16, 16, 16), trainer="nnUNetTrainerNoMirroring",
                               seed=tid, mirror_axes=None, background_bias=part_bias)
    if fast:
        make_result_folder(results, "Dataset297_TotalSegmentator_total_3mm_1559subj", all_names,
                           spacing=(3.0, 3.0, 3.0), patch=(16, 16, 16),
                           trainer="nnUNetTrainer_4000epochs_NoMirroring", seed=297,
                           mirror_axes=None)
    if mr:
        make_result_folder(results, "Dataset852_TotalSegMRI_total_3mm_1088subj",
                           TOTALSEG_MR_PARTS[0] + TOTALSEG_MR_PARTS[1], spacing=(3.0, 3.0, 3.0),
                           patch=(16, 16, 16), trainer="nnUNetTrainer_2000epochs_NoMirroring",
                           seed=852, mirror_axes=None, normalization="ZScoreNormalization",
                           channel="MRI")
    return Path(home)
